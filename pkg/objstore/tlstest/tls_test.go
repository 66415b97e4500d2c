package tlstest

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// Over TLS with the SDK's default checksums, single PUTs and multipart
// parts read back byte-identical (a server that stored the aws-chunked
// framing would fail the sha256 comparison), and the store trusts the
// gateway's self-signed CA from CAFile.
func TestDefaultChecksumsOverTLS(t *testing.T) {
	b := tlsBucket(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	small := random(t, 1024)
	if _, err := b.Put(ctx, objstore.PutInput{Key: "small", ContentType: "application/octet-stream"}, small); err != nil {
		t.Fatal(err)
	}
	readBack(ctx, t, b, "small", small)

	const part = 5 << 20
	large := random(t, 2*part+777)
	id, err := b.CreateMultipart(ctx, objstore.PutInput{Key: "large", ContentType: "application/octet-stream"})
	if err != nil {
		t.Fatal(err)
	}
	var parts []objstore.Part
	for i := 0; i*part < len(large); i++ {
		etag, err := b.UploadPart(ctx, "large", id, int32(i+1), large[i*part:min(len(large), (i+1)*part)])
		if err != nil {
			_ = b.AbortMultipart(ctx, "large", id)
			t.Fatal(err)
		}
		parts = append(parts, objstore.Part{Number: int32(i + 1), ETag: etag})
	}
	if _, err := b.CompleteMultipart(ctx, "large", id, parts); err != nil {
		t.Fatal(err)
	}
	readBack(ctx, t, b, "large", large)
}

// tlsBucket is a fresh bucket on the TLS gateway, trusted through CAFile,
// with the SDK's default checksums or the production setting.
func tlsBucket(t *testing.T, sdkDefaultChecksums bool) *objstore.Bucket {
	t.Helper()
	g := testenv.S3TLS(t)
	name := testenv.NewBucket(t, g)
	s, err := objstore.New(objstore.Options{
		Credentials:         objstore.StaticCredentials{"R": {g.AccessKey, g.SecretKey}},
		CAFile:              g.CAFile,
		SDKDefaultChecksums: sdkDefaultChecksums,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	b, err := s.Bucket(objstore.Target{ID: name, Name: name, Endpoint: g.Endpoint, Region: g.Region, CredentialsRef: "R", PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readBack(ctx context.Context, t *testing.T, b *objstore.Bucket, key string, want []byte) {
	t.Helper()
	body, info, err := b.Get(ctx, key, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	got, err := io.ReadAll(body)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(want) || info.Size != int64(len(want)) {
		t.Fatalf("%s read back %d bytes (info size %d), want %d identical bytes", key, len(got), info.Size, len(want))
	}
	if !bytes.Equal(got[:16], want[:16]) {
		t.Fatalf("%s starts with framing, not data", key)
	}
}

func random(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// Over TLS with the production checksum setting (only where required), a
// part streamed from a reader that cannot seek goes out with its length and
// no trailer, and its ETag is its MD5: the upload service's streamed-part
// path against an HTTPS endpoint such as R2.
func TestStreamedPartOverTLS(t *testing.T) {
	b := tlsBucket(t, false)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := random(t, 5<<20)
	id, err := b.CreateMultipart(ctx, objstore.PutInput{Key: "streamed", ContentType: "application/octet-stream"})
	if err != nil {
		t.Fatal(err)
	}
	etag, err := b.UploadPartStream(ctx, "streamed", id, 1, struct{ io.Reader }{bytes.NewReader(data)}, int64(len(data)))
	if err != nil {
		_ = b.AbortMultipart(ctx, "streamed", id)
		t.Fatal(err)
	}
	if sum, ok := objstore.PartETagMD5(etag); !ok || !bytes.Equal(sum, md5sum(data)) {
		t.Fatalf("etag %s is not the part's MD5", etag)
	}
	if _, err := b.CompleteMultipart(ctx, "streamed", id, []objstore.Part{{Number: 1, ETag: etag}}); err != nil {
		t.Fatal(err)
	}
	readBack(ctx, t, b, "streamed", data)
}

func md5sum(b []byte) []byte {
	s := md5.Sum(b)
	return s[:]
}
