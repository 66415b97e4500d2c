package uploader_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// A bucket's failure reaches the client as what the bucket did, in a few
// words, naming the bucket: never the SDK's text, which holds the internal
// endpoint URL, the object's path and request ids (those go to the log).
func TestBucketFailuresAreWordedForClients(t *testing.T) {
	st := startStack(t, 2, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stored, err := sendBytes(ctx, t, st, "a.bin", testenv.OpaqueBytes(t, 1000))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Proxies {
		p.Set(faultproxy.Error5xx)
	}
	check := func(what string, err error, want string) {
		t.Helper()
		checkWorded(t, what, err, codes.Unavailable, want)
		// Retryable, as every bucket failure is: a retry may find a
		// bucket that works. Worded for the client, not the allocator.
		if !hasRetryInfo(err) {
			t.Fatalf("%s: %v, want a retry delay", what, err)
		}
		for _, s := range []string{"bucket(s)", "excluded by the caller"} {
			if strings.Contains(status.Convert(err).Message(), s) {
				t.Fatalf("%s: %q says %q", what, status.Convert(err).Message(), s)
			}
		}
	}
	_, err = sendBytes(ctx, t, st, "b.bin", testenv.OpaqueBytes(t, 1000))
	check("one PUT", err, "HTTP 500 (InternalError)")
	big := testenv.OpaqueBytes(t, 9<<20)
	_, err = sendBytes(ctx, t, st, "c.bin", big)
	check("multipart", err, "HTTP 500 (InternalError)")
	_, _, err = read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: stored.GetBucketId(), Key: stored.GetKey()})
	check("read", err, "bucket "+stored.GetBucketId()+": HTTP 500 (InternalError)")
	// A 200 whose body breaks off is not "HTTP 200".
	for _, p := range st.Proxies {
		p.Set(faultproxy.Pass)
		p.SetFor("CompleteMultipartUpload", faultproxy.Truncate)
	}
	_, err = sendBytes(ctx, t, st, "e.bin", big)
	check("multipart, its completion's answer cut short", err, "completing the upload on bucket")
	if strings.Contains(status.Convert(err).Message(), "HTTP 200") {
		t.Fatalf("a broken-off 200 worded as a status: %v", err)
	}
	for _, p := range st.Proxies {
		p.Set(faultproxy.Reset)
	}
	_, err = sendBytes(ctx, t, st, "d.bin", testenv.OpaqueBytes(t, 1000))
	check("one PUT, connection reset", err, "with connection broken off")
}

// A write answered 2xx without an ETag, which S3 and R2 always send (a
// proxy's empty page, a wrong endpoint), is no success: nothing is
// committed for bytes that are nowhere, and what the answer may have
// stood for is removed.
func TestWriteAnsweredWithoutAnETagIsNoSuccess(t *testing.T) {
	st := startStack(t, 1, nil)
	id := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, tc := range []struct {
		op   string
		size int
	}{{"PutObject", 1000}, {"CompleteMultipartUpload", 9 << 20}} {
		st.Proxies[id].SetFor(tc.op, faultproxy.Unapplied)
		_, err := sendBytes(ctx, t, st, "e.bin", testenv.OpaqueBytes(t, tc.size))
		checkWorded(t, tc.op+" answered without an ETag", err, codes.Unavailable, "the bucket answered the write without an ETag")
		st.Proxies[id].Set(faultproxy.Pass)
		st.waitNoReservations(t)
		objects, multiparts := st.objects(t)
		if used, _ := st.usage(t); used[id] != 0 || objects[id] != 0 || multiparts[id] != 0 {
			t.Fatalf("%s answered without an ETag: %d bytes used, %d objects, %d open uploads; want none", tc.op, used[id], objects[id], multiparts[id])
		}
	}
}

// failingCommits refuses every Commit while on is set.
type failingCommits struct {
	uploader.Allocator
	on atomic.Bool
}

func (f *failingCommits) Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error) {
	if f.on.Load() {
		return nil, status.Error(codes.Internal, "commit refused by the test")
	}
	return f.Allocator.Commit(ctx, in, opts...)
}

// A failure names its object in the log, which the client's few words
// leave out: a bucket failing a read or a delete is logged with the key
// and the SDK's whole text, and a failed upload with its key and bucket.
// A Commit the allocator refused is not worded as a bucket's failure.
func TestFailuresAreLoggedWithTheirObject(t *testing.T) {
	fc := &failingCommits{}
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, func(a uploader.Allocator) uploader.Allocator {
		fc.Allocator = a
		return fc
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stored, err := sendBytes(ctx, t, st, "a.bin", testenv.OpaqueBytes(t, 1000))
	if err != nil {
		t.Fatal(err)
	}
	id := stored.GetBucketId()
	st.Proxies[id].Set(faultproxy.Error5xx)
	if _, _, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: id, Key: stored.GetKey()}); err == nil {
		t.Fatal("a read from a failing bucket succeeded")
	}
	if _, err := st.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: id, Key: stored.GetKey()}); err == nil {
		t.Fatal("a delete in a failing bucket succeeded")
	}
	st.Proxies[id].Set(faultproxy.Pass)
	fc.on.Store(true)
	_, err = send(ctx, st.Upload, &uploadv1.UploadHeader{Key: "logged/b.bin", ContentType: "application/octet-stream", Size: 1000}, testenv.OpaqueBytes(t, 1000))
	if msg := status.Convert(err).Message(); status.Code(err) != codes.Unavailable || strings.Contains(msg, "bucket failed") {
		t.Fatalf("upload whose Commit was refused: %v, want UNAVAILABLE not blaming the bucket", err)
	}
	logs := st.Logs.String()
	for _, want := range []string{
		`"op":"read","error":`, `"op":"look up the object","error":`,
		`"key":"` + stored.GetKey() + `"`,
		`"msg":"upload failed"`, `"key":"logged/b.bin","bucket":"` + id + `"`,
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("the log holds no %s:\n%s", want, logs)
		}
	}
}

// checkWorded fails unless err has code and says want, without the SDK's
// text or the object's path.
func checkWorded(t *testing.T, what string, err error, code codes.Code, want string) {
	t.Helper()
	msg := status.Convert(err).Message()
	if status.Code(err) != code || !strings.Contains(msg, want) {
		t.Fatalf("%s: %v, want %v saying %q", what, err, code, want)
	}
	for _, leak := range []string{"http://", "127.0.0.1", "RequestID", "operation error", ".bin"} {
		if strings.Contains(msg, leak) {
			t.Fatalf("%s: the client's message %q holds %q", what, msg, leak)
		}
	}
}

// A bucket's 4xx without an S3 error document (an HTML page from a proxy
// in front of it) is the request's refusal, worded like any other: not
// INTERNAL with the SDK's text.
func TestRefusalWithoutAnS3ErrorIsWorded(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stored, err := sendBytes(ctx, t, st, "a.bin", testenv.OpaqueBytes(t, 1000))
	if err != nil {
		t.Fatal(err)
	}
	st.Proxies[stored.GetBucketId()].Set(faultproxy.HTMLBadRequest)
	const want = "the bucket refused the request: no S3 error in its answer, HTTP 400"
	_, err = sendBytes(ctx, t, st, "b.bin", testenv.OpaqueBytes(t, 1000))
	checkWorded(t, "one PUT", err, codes.InvalidArgument, want)
	big := testenv.OpaqueBytes(t, 9<<20)
	_, err = sendBytes(ctx, t, st, "c.bin", big)
	checkWorded(t, "multipart", err, codes.InvalidArgument, want)
	_, _, err = read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: stored.GetBucketId(), Key: stored.GetKey()})
	checkWorded(t, "read", err, codes.InvalidArgument, want)
	// A delete asks with a HEAD first, whose answer has no body at all.
	_, err = st.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: stored.GetBucketId(), Key: stored.GetKey()})
	checkWorded(t, "delete", err, codes.InvalidArgument, want)
}

// sendBytes uploads data under a key made from name, as an opaque object.
func sendBytes(ctx context.Context, t *testing.T, st *stack, name string, data []byte) (*uploadv1.UploadResponse, error) {
	t.Helper()
	return send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: name, ContentType: "application/octet-stream", Size: int64(len(data))}, data)
}
