// Package e2e holds the end-to-end scenarios run against a full dev stack
// (real embedded etcd, real S3 gateway, real gRPC on loopback). Test
// packages call them once with plain HTTP and once with TLS, because the
// gateway runs once per process.
package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
)

// Env is a running stack with connected clients.
type Env struct {
	Stack  *devstack.Stack
	Upload uploadv1.UploadServiceClient
	Admin  adminv1.AdminServiceClient
	S3     *s3.Client
	store  *objstore.Store // for Direct
}

// Start runs a dev stack on OS-chosen loopback ports in a temp dir.
func Start(t testing.TB, tls bool) *Env {
	return StartWith(t, devstack.Options{S3TLS: tls})
}

// StartWith runs a dev stack with opts, forcing OS-chosen loopback ports
// and a temp data dir.
func StartWith(t testing.TB, opts devstack.Options) *Env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	opts.DataDir = t.TempDir()
	opts.EtcdAddr, opts.AllocatorAddr, opts.UploadAddr, opts.S3Addr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	st, err := devstack.Start(ctx, opts)
	if err != nil {
		t.Fatalf("start dev stack: %v", err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("close dev stack: %v", err)
		}
		if err := st.Err(); err != nil {
			t.Errorf("dev stack background error: %v", err)
		}
	})
	uc, err := devstack.Dial(st.UploadAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	var aopts []grpc.DialOption
	if opts.AllocatorTLS != nil {
		aopts = append(aopts, grpc.WithTransportCredentials(credentials.NewTLS(opts.AllocatorClientTLS)))
	}
	ac, err := devstack.Dial(st.AllocatorAddr, aopts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ac.Close() })
	s3c, err := st.S3.Client()
	if err != nil {
		t.Fatal(err)
	}
	store, err := objstore.New(objstore.Options{
		Credentials: objstore.StaticCredentials{directRef: {st.S3.AccessKey, st.S3.SecretKey}}, CAFile: st.S3.CAFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	return &Env{Stack: st, Upload: uploadv1.NewUploadServiceClient(uc), Admin: adminv1.NewAdminServiceClient(ac), S3: s3c, store: store}
}

const directRef = "DEV"

// Direct is a handle on the stack's bucket id through the S3 SDK alone,
// bypassing the service: the baseline of a benchmark, or a test changing
// what a bucket holds behind the service's back.
func (e *Env) Direct(t testing.TB, id string) *objstore.Bucket {
	t.Helper()
	name := id
	for _, b := range e.Stack.Buckets {
		if b.GetId() == id {
			name = b.GetName()
		}
	}
	gw := e.Stack.S3
	b, err := e.store.Bucket(objstore.Target{ID: id, Name: name, Endpoint: gw.Endpoint, Region: gw.Region, CredentialsRef: directRef, PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// AdminCtx returns a context carrying the admin token.
func (e *Env) AdminCtx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+e.Stack.AdminToken)
}

// Usage returns committed and reserved bytes per bucket id.
func (e *Env) Usage(t testing.TB) (used, reserved map[string]int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := e.Admin.GetStatus(e.AdminCtx(ctx), &adminv1.GetStatusRequest{})
	if err != nil {
		t.Fatalf("GetStatus: %v", err)
	}
	used, reserved = map[string]int64{}, map[string]int64{}
	for _, b := range st.GetBuckets() {
		used[b.GetBucket().GetId()] = b.GetUsedBytes()
		reserved[b.GetBucket().GetId()] = b.GetReservedBytes()
	}
	return used, reserved
}

// ObjectCount counts objects and open multipart uploads over all buckets,
// read straight from the gateway.
func (e *Env) ObjectCount(t testing.TB) (objects, multiparts int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, b := range e.Stack.Buckets {
		out, err := e.S3.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: aws.String(b.GetName())})
		if err != nil {
			t.Fatalf("list %s: %v", b.GetName(), err)
		}
		objects += len(out.Contents)
		mp, err := e.S3.ListMultipartUploads(ctx, &s3.ListMultipartUploadsInput{Bucket: aws.String(b.GetName())})
		if err != nil {
			t.Fatalf("list multipart %s: %v", b.GetName(), err)
		}
		multiparts += len(mp.Uploads)
	}
	return objects, multiparts
}

// RandomBytes returns n random bytes that sniff as application/octet-stream.
func RandomBytes(t testing.TB, n int) []byte {
	t.Helper()
	return testenv.OpaqueBytes(t, n)
}

// HexSHA is the lowercase hex SHA-256 of b.
func HexSHA(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// RoundTrip uploads 20 MiB, reads it back through the service and straight
// from the bucket, and checks that the committed usage equals the bytes.
func RoundTrip(t *testing.T, e *Env) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	usedBefore, _ := e.Usage(t)
	data := RandomBytes(t, 20<<20)
	want := HexSHA(data)
	resp, err := uploadclient.Upload(ctx, e.Upload, &uploadv1.UploadHeader{
		NameHint: "big.bin", ContentType: "application/octet-stream", Size: int64(len(data)), Sha256: want,
	}, bytes.NewReader(data), uploadclient.Options{})
	if err != nil {
		t.Fatalf("upload: %v", err)
	}
	if resp.GetSize() != int64(len(data)) || resp.GetSha256() != want || resp.GetKey() == "" || resp.GetBucketId() == "" {
		t.Fatalf("response = %v, want size %d sha256 %s", resp, len(data), want)
	}
	// priority-first: the lowest priority number takes it.
	if resp.GetBucketId() != "dev-hot" {
		t.Errorf("bucket = %s, want dev-hot (priority 1)", resp.GetBucketId())
	}

	var back bytes.Buffer
	info, err := uploadclient.Get(ctx, e.Upload, &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}, &back, nil)
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if got := HexSHA(back.Bytes()); got != want || info.GetSize() != int64(len(data)) {
		t.Fatalf("read back %d bytes sha256 %s, want %d bytes %s", back.Len(), got, len(data), want)
	}

	// Straight from the bucket, not through bucketlb.
	obj, err := e.S3.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(resp.GetBucketName()), Key: aws.String(resp.GetKey())})
	if err != nil {
		t.Fatalf("direct get: %v", err)
	}
	raw, err := io.ReadAll(obj.Body)
	obj.Body.Close()
	if err != nil || HexSHA(raw) != want {
		t.Fatalf("object in bucket differs: %d bytes, err %v", len(raw), err)
	}

	used, reserved := e.Usage(t)
	if got := used[resp.GetBucketId()] - usedBefore[resp.GetBucketId()]; got != int64(len(data)) {
		t.Fatalf("usage grew by %d bytes, want exactly %d", got, len(data))
	}
	if r := reserved[resp.GetBucketId()]; r < 0 {
		t.Fatalf("negative reserved bytes %d", r)
	}
}

// BadInput sends malformed streams and checks INVALID_ARGUMENT with a
// sentence, no object left behind and usage unchanged.
func BadInput(t *testing.T, e *Env) {
	cases := []struct {
		name string
		msgs []*uploadv1.UploadRequest
	}{
		{"chunk before header", []*uploadv1.UploadRequest{
			{Payload: &uploadv1.UploadRequest_Chunk{Chunk: []byte("hello")}},
		}},
		{"missing header", nil},
		{"empty first message", []*uploadv1.UploadRequest{{}}},
		{"declared size larger than sent", []*uploadv1.UploadRequest{
			header(&uploadv1.UploadHeader{NameHint: "a.txt", ContentType: "text/plain", Size: 100}),
			{Payload: &uploadv1.UploadRequest_Chunk{Chunk: []byte("only fifty bytes.................................")}},
		}},
		{"declared size smaller than sent", []*uploadv1.UploadRequest{
			header(&uploadv1.UploadHeader{NameHint: "a.txt", ContentType: "text/plain", Size: 4}),
			{Payload: &uploadv1.UploadRequest_Chunk{Chunk: []byte("more than four bytes")}},
		}},
		{"second header", []*uploadv1.UploadRequest{
			header(&uploadv1.UploadHeader{NameHint: "a.txt", ContentType: "text/plain", Size: 5}),
			header(&uploadv1.UploadHeader{NameHint: "a.txt", ContentType: "text/plain", Size: 5}),
		}},
	}
	objBefore, _ := e.ObjectCount(t)
	usedBefore, _ := e.Usage(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			stream, err := e.Upload.Upload(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range tc.msgs {
				if err := stream.Send(m); err != nil {
					break // the server already answered; CloseAndRecv has the status
				}
			}
			_, err = stream.CloseAndRecv()
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("code = %v (%v), want InvalidArgument", status.Code(err), err)
			}
			if msg := status.Convert(err).Message(); len(msg) < 10 {
				t.Fatalf("message %q is not a sentence", msg)
			}
		})
	}
	// Cleanup runs before the handler returns, so nothing is pending here.
	objects, multiparts := e.ObjectCount(t)
	if objects != objBefore || multiparts != 0 {
		t.Fatalf("bad input left %d new objects and %d open multipart uploads", objects-objBefore, multiparts)
	}
	used, reserved := e.Usage(t)
	for id, u := range used {
		if u != usedBefore[id] {
			t.Errorf("bucket %s usage changed %d -> %d on bad input", id, usedBefore[id], u)
		}
	}
	WaitNoReservations(t, e, reserved)
}

// WaitNoReservations polls until no bucket reports reserved bytes,
// failing after a deadline. GetStatus counts live reservations and the
// capacity blocks allocators hold (given back after a short idle time),
// so this waits for both.
func WaitNoReservations(t *testing.T, e *Env, last map[string]int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		total := int64(0)
		for _, r := range last {
			total += r
		}
		if total == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("reservations not returned: %v", last)
		}
		time.Sleep(20 * time.Millisecond) // polling interval, not a wait for an event
		_, last = e.Usage(t)
	}
}

func header(h *uploadv1.UploadHeader) *uploadv1.UploadRequest {
	return &uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: h}}
}
