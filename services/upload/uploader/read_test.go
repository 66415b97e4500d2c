package uploader_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// read collects a GetObject stream: the info message, then the data.
func read(ctx context.Context, c uploadv1.UploadServiceClient, req *uploadv1.GetObjectRequest) (*uploadv1.ObjectInfo, []byte, error) {
	var buf bytes.Buffer
	info, err := uploadclient.Get(ctx, c, req, &buf, nil)
	if err != nil {
		return nil, nil, err
	}
	return info, buf.Bytes(), nil
}

// rawRead reads a GetObject stream as it comes, without uploadclient's
// own byte count and sha256 check, so a test sees what the service sent:
// how many info messages, the bytes, and how the stream ended.
func rawRead(ctx context.Context, c uploadv1.UploadServiceClient, req *uploadv1.GetObjectRequest) (infos int, got []byte, err error) {
	stream, err := c.GetObject(ctx, req)
	if err != nil {
		return 0, nil, err
	}
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return infos, got, nil
		}
		if err != nil {
			return infos, got, err
		}
		if m.GetInfo() != nil {
			infos++
		}
		got = append(got, m.GetChunk()...)
	}
}

// readBack fails the test unless the uploaded object reads back as want;
// what names the case in the message.
func readBack(ctx context.Context, t *testing.T, c uploadv1.UploadServiceClient, resp *uploadv1.UploadResponse, want []byte, what string) {
	t.Helper()
	_, got, err := read(ctx, c, &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()})
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s: read back %d bytes (equal %v), err %v", what, len(got), bytes.Equal(got, want), err)
	}
}

// stored uploads n opaque random bytes under a generated key and returns
// the request that reads them back, and the bytes.
func stored(ctx context.Context, t *testing.T, c uploadv1.UploadServiceClient, n int) (*uploadv1.GetObjectRequest, []byte) {
	t.Helper()
	data := testenv.OpaqueBytes(t, n)
	resp, err := send(ctx, c, &uploadv1.UploadHeader{NameHint: "r.bin", ContentType: "application/octet-stream", Size: int64(n)}, data)
	if err != nil {
		t.Fatal(err)
	}
	return &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}, data
}

// GetObject by bucket id + key, whole and by range; DeleteObject; then
// NOT_FOUND for the deleted key and an unknown bucket, INVALID_ARGUMENT for
// a negative range. Usage stays: a delete does not give back the period's
// budget (the provider counts bytes written).
func TestGetRangeAndDelete(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, data := stored(ctx, t, st.Upload, 600_000)
	info, got, err := read(ctx, st.Upload, req)
	if err != nil || !bytes.Equal(got, data) || info.GetSize() != int64(len(data)) {
		t.Fatalf("whole read: %d bytes, info %v, err %v", len(got), info, err)
	}
	info, got, err = read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey(), Offset: 300_000, Length: 1000})
	if err != nil || !bytes.Equal(got, data[300_000:301_000]) || info.GetSize() != int64(len(data)) || info.GetContentLength() != 1000 {
		t.Fatalf("range read: %d bytes, info %v, err %v", len(got), info, err)
	}
	// A length past the largest offset reads to the end, from the offset.
	if _, got, err = read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey(), Offset: 10, Length: math.MaxInt64}); err != nil || !bytes.Equal(got, data[10:]) {
		t.Fatalf("range to MaxInt64: %d bytes (from the offset %v), err %v", len(got), bytes.Equal(got, data[10:]), err)
	}
	if _, _, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey(), Offset: int64(len(data))}); status.Code(err) != codes.OutOfRange {
		t.Fatalf("offset at the object's end: %v, want OutOfRange", err)
	}
	if _, _, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey(), Offset: -1}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("negative offset: %v, want InvalidArgument", err)
	}
	if _, _, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: "no-such-bucket", Key: req.GetKey()}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown bucket: %v, want NotFound", err)
	}
	if _, err := st.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey()}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := read(ctx, st.Upload, req); status.Code(err) != codes.NotFound {
		t.Fatalf("read after delete: %v, want NotFound", err)
	}
	if _, err := st.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey()}); status.Code(err) != codes.NotFound {
		t.Fatalf("delete of a deleted object: %v, want NotFound", err)
	}
	if used, _ := st.usage(t); used[req.GetBucketId()] != int64(len(data)) {
		t.Fatalf("usage after delete %d, want %d (deletes keep the period's count)", used[req.GetBucketId()], len(data))
	}
}

// lookupCounter counts the allocator's LookupBucket calls.
type lookupCounter struct {
	uploader.Allocator
	n atomic.Int32
}

func (c *lookupCounter) LookupBucket(ctx context.Context, in *allocatorv1.LookupBucketRequest, opts ...grpc.CallOption) (*allocatorv1.LookupBucketResponse, error) {
	c.n.Add(1)
	return c.Allocator.LookupBucket(ctx, in, opts...)
}

// Reads and deletes reuse where the allocator said a bucket lives for two
// seconds instead of asking it each time; after that they ask again, so a
// state change reaches them.
func TestReadsReuseTheBucketTarget(t *testing.T) {
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	counter := &lookupCounter{}
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil,
		func(c *uploader.Config) { c.Now = func() time.Time { return time.Unix(0, now.Load()) } },
		func(a uploader.Allocator) uploader.Allocator { counter.Allocator = a; return counter })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, data := stored(ctx, t, st.Upload, 1000)
	for i := 0; i < 3; i++ {
		readBack(ctx, t, st.Upload, &uploadv1.UploadResponse{BucketId: req.GetBucketId(), Key: req.GetKey()}, data, "read")
	}
	if _, err := st.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: req.GetBucketId(), Key: "absent/key"}); status.Code(err) != codes.NotFound {
		t.Fatalf("delete of an absent key: %v, want NotFound", err)
	}
	if n := counter.n.Load(); n != 1 {
		t.Fatalf("%d LookupBucket calls for three reads and a delete within two seconds, want 1", n)
	}
	now.Add(int64(2 * time.Second))
	readBack(ctx, t, st.Upload, &uploadv1.UploadResponse{BucketId: req.GetBucketId(), Key: req.GetKey()}, data, "read after two seconds")
	if n := counter.n.Load(); n != 2 {
		t.Fatalf("%d LookupBucket calls after the target aged two seconds, want 2", n)
	}
}

// A DISABLED bucket serves nothing: reads and deletes answer
// FAILED_PRECONDITION and the object stays; DRAINING serves both again.
func TestDisabledBucketServesNoReads(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, data := stored(ctx, t, st.Upload, 1000)
	setState := func(state adminv1.BucketState) {
		t.Helper()
		if _, err := st.Admin.SetBucketState(st.adminCtx(ctx), &adminv1.SetBucketStateRequest{Id: req.GetBucketId(), State: state}); err != nil {
			t.Fatal(err)
		}
	}
	setState(adminv1.BucketState_BUCKET_STATE_DISABLED)
	// The allocator learns of the change through its watch.
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, _, err = read(ctx, st.Upload, req); status.Code(err) == codes.FailedPrecondition || time.Now().After(deadline) {
			break
		}
	}
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "DISABLED") {
		t.Fatalf("read from a disabled bucket: %v, want FailedPrecondition", err)
	}
	if _, err := st.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey()}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("delete in a disabled bucket: %v, want FailedPrecondition", err)
	}
	if objects, _ := st.objects(t); objects[req.GetBucketId()] != 1 {
		t.Fatalf("%d objects in the disabled bucket, want the 1 stored", objects[req.GetBucketId()])
	}
	setState(adminv1.BucketState_BUCKET_STATE_DRAINING)
	var got []byte
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, got, err = read(ctx, st.Upload, req); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read from a draining bucket: %d bytes, %v", len(got), err)
	}
	if _, err := st.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey()}); err != nil {
		t.Fatalf("delete in a draining bucket: %v", err)
	}
}

// A bucket whose spec names an S3 bucket its endpoint does not have (a
// typo, a renamed bucket) is the bucket's fault, not a missing object: a
// client told NOT_FOUND would drop its record of objects that are there.
func TestMissingS3BucketIsNotAMissingObject(t *testing.T) {
	notS3 := httptest.NewServer(http.NotFoundHandler()) // a bare 404, no S3 error
	defer notS3.Close()
	for _, tc := range []struct {
		name   string
		change func(*adminv1.BucketSpec)
	}{
		{"S3 bucket renamed", func(b *adminv1.BucketSpec) { b.Name = "no-such-bucket" }},
		{"endpoint not S3", func(b *adminv1.BucketSpec) { b.Endpoint = notS3.URL }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := startStack(t, 1, nil)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			req, _ := stored(ctx, t, st.Upload, 1000)
			var spec *adminv1.BucketSpec
			for _, b := range st.Buckets {
				if b.GetId() == req.GetBucketId() {
					spec = proto.Clone(b).(*adminv1.BucketSpec)
				}
			}
			tc.change(spec)
			if _, err := st.Admin.PutBucket(st.adminCtx(ctx), &adminv1.PutBucketRequest{Bucket: spec}); err != nil {
				t.Fatal(err)
			}
			// The services learn of the change through their watches.
			var err error
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if _, _, err = read(ctx, st.Upload, req); err != nil || time.Now().After(deadline) {
					break
				}
			}
			_, derr := st.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: req.GetBucketId(), Key: req.GetKey()})
			for what, err := range map[string]error{"read": err, "delete": derr} {
				if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "S3 bucket does not exist") {
					t.Errorf("%s in a bucket whose S3 bucket is missing: %v, want UNAVAILABLE naming the missing bucket", what, err)
				}
			}
			if objects, _ := st.objects(t); objects[req.GetBucketId()] != 1 {
				t.Fatalf("%d objects in the bucket, want the 1 stored", objects[req.GetBucketId()])
			}
		})
	}
}

// A read answered 2xx without an ETag, which S3 and R2 always send (a
// proxy's empty page), is no object: it is tried again, and never ends a
// read as if it were the object (an empty one, say).
func TestReadAnsweredWithoutAnETagIsNoObject(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, data := stored(ctx, t, st.Upload, 100_000)
	proxy := st.Proxies[req.GetBucketId()]
	proxy.SetForNext("GetObject", faultproxy.Unapplied, 1)
	if _, got, err := read(ctx, st.Upload, req); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after one answer without an ETag: %d bytes, %v; want the %d stored", len(got), err, len(data))
	}
	proxy.SetFor("GetObject", faultproxy.Unapplied)
	_, got, err := read(ctx, st.Upload, req)
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "without an ETag") {
		t.Fatalf("read answered only without an ETag: %d bytes, %v; want UNAVAILABLE saying so", len(got), err)
	}
}

// A bucket that stops sending an object midway fails the read UNAVAILABLE
// once no byte has come for the call timeout, even for a client without a
// deadline, and the read's buffers go back to the budget.
func TestStalledReadFailsUnavailable(t *testing.T) {
	st := startStack(t, 1, func(c *uploader.Config) { c.CallTimeout = 500 * time.Millisecond })
	id := st.Buckets[0].GetId()
	st.Proxies[id].StallFor = 30 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, _ := stored(ctx, t, st.Upload, 600_000)
	st.Proxies[id].SetFor("GetObject", faultproxy.StallBody)
	_, _, err := read(context.Background(), st.Upload, req)
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "stopped sending") {
		t.Fatalf("read from a stalled bucket: %v, want Unavailable saying the bucket stopped sending", err)
	}
	if held := st.Server.BufferHeld(); held != 0 {
		t.Fatalf("%d bytes of buffer still held after the read failed", held)
	}
}

// A client that opens a read and stops taking the data is let go after
// the idle timeout: gRPC's flow control would otherwise hold the handler's
// Send, and with it the read's buffers, for as long as the connection
// lives.
func TestClientThatStopsReadingIsLetGo(t *testing.T) {
	st := startStack(t, 1, func(c *uploader.Config) { c.IdleTimeout = 500 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Larger than the flow-control windows gRPC grows to (16 MiB).
	req, _ := stored(ctx, t, st.Upload, 40<<20)
	stream, err := st.Upload.GetObject(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if first, err := stream.Recv(); err != nil || first.GetInfo() == nil {
		t.Fatalf("first message: %v, %v", first, err)
	}
	for deadline := time.Now().Add(20 * time.Second); st.Server.BufferHeld() != 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a read whose client stopped taking data still holds %d bytes of buffer", st.Server.BufferHeld())
		}
	}
	// The client finds out when it reads again.
	for {
		if _, err = stream.Recv(); err != nil {
			break
		}
	}
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), "took less than one message (256 KiB) in 500ms") {
		t.Fatalf("the stalled reader got %v, want DeadlineExceeded saying it took less than one message", err)
	}
}

// Every part upload fails on the only bucket: parts are retried, then the
// multipart upload is aborted, the reservation released, and the client
// told UNAVAILABLE (retryable).
func TestPartFailureAborts(t *testing.T) {
	st := startStack(t, 1, nil)
	id := st.Buckets[0].GetId()
	st.Proxies[id].SetFor("UploadPart", faultproxy.Error5xx)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 9<<20)
	st.Proxies[id].Counts()
	_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "p.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("upload with failing parts: %v, want Unavailable", err)
	}
	counts := st.Proxies[id].Counts()
	if counts["UploadPart"] < 3 || counts["AbortMultipartUpload"] != 1 || counts["CompleteMultipartUpload"] != 0 {
		t.Fatalf("S3 requests %v: want part retries, one abort, no complete", counts)
	}
	objects, multiparts := st.objects(t)
	if objects[id] != 0 || multiparts[id] != 0 {
		t.Fatalf("%d objects and %d open multipart uploads left, want none", objects[id], multiparts[id])
	}
	if used, _ := st.usage(t); used[id] != 0 {
		t.Fatalf("usage %d after a failed upload", used[id])
	}
	st.waitNoReservations(t)
}

// Chunks of any size land intact: chunk sizes that straddle the sniffed
// head, part boundaries and each other (the codec writes most chunks
// straight into the part buffer and keeps the rest of a straddling one
// aside), for a small and a multipart object, read back byte for byte.
func TestOddChunkSizesReadBack(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, tc := range []struct{ size, chunk int }{
		{size: 5_000, chunk: 1},
		{size: 700_001, chunk: 99_991},
		{size: 20<<20 + 12_345, chunk: 333_337},
		{size: 20<<20 + 12_345, chunk: uploader.MaxChunk - 7}, // the largest chunks there are
	} {
		data := testenv.OpaqueBytes(t, tc.size)
		resp, err := uploadclient.Upload(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "odd.bin", ContentType: "application/octet-stream", Size: int64(len(data))},
			bytes.NewReader(data), uploadclient.Options{ChunkSize: tc.chunk})
		if err != nil {
			t.Fatalf("size %d chunk %d: %v", tc.size, tc.chunk, err)
		}
		readBack(ctx, t, st.Upload, resp, data, fmt.Sprintf("size %d chunk %d", tc.size, tc.chunk))
	}
}

// A bucket that ends a body before its Content-Length does not end the
// GetObject stream as if the object were whole (it did: a client without
// a byte count of its own, grpcurl say, took half an object for all of
// it). Cut short once, the read goes on from the next byte; cut short on
// every GET, the stream fails UNAVAILABLE.
func TestTruncatedReadsNeverEndCleanly(t *testing.T) {
	st := startStackAt(t, []string{testenv.S3(t).Endpoint}, nil, nil)
	proxy := st.Proxies[st.Buckets[0].GetName()]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, data := stored(ctx, t, st.Upload, 1<<20)
	raw := func() ([]byte, error) {
		_, got, err := rawRead(ctx, st.Upload, req)
		return got, err
	}
	proxy.SetForNext("GetObject", faultproxy.Truncate, 1)
	if got, err := raw(); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read cut short once: %d bytes (equal %v), %v", len(got), bytes.Equal(got, data), err)
	}
	proxy.SetFor("GetObject", faultproxy.Truncate)
	got, err := raw()
	if status.Code(err) != codes.Unavailable || len(got) >= len(data) {
		t.Fatalf("read cut short every time: %d of %d bytes, %v; want UNAVAILABLE", len(got), len(data), err)
	}
}

// A bucket's wrong bytes never end a read as if they were the object. A
// whole object that fits in one chunk is checked before anything is
// sent: a bit flipped on one read is read again and the client gets the
// stored bytes; flipped on every read, the client gets DATA_LOSS and no
// byte. A larger object fails DATA_LOSS in place of its last chunk.
func TestCorruptReadsNeverEndCleanly(t *testing.T) {
	tel := newTelemetry(t, "upload-test")
	st := startStackAt(t, []string{testenv.S3(t).Endpoint}, nil, func(c *uploader.Config) { c.Metrics = tel.Metrics() })
	proxy := st.Proxies[st.Buckets[0].GetName()]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	raw := func(req *uploadv1.GetObjectRequest) (int, []byte, error) { return rawRead(ctx, st.Upload, req) }
	small, smallData := stored(ctx, t, st.Upload, 100_000)
	large, largeData := stored(ctx, t, st.Upload, 1<<20)

	proxy.SetForNext("GetObject", faultproxy.CorruptAnswer, 1)
	if infos, got, err := raw(small); err != nil || infos != 1 || !bytes.Equal(got, smallData) {
		t.Fatalf("small object corrupted on one read: %d infos, %d bytes (equal %v), %v; want the stored bytes", infos, len(got), bytes.Equal(got, smallData), err)
	}
	proxy.SetFor("GetObject", faultproxy.CorruptAnswer)
	proxy.Counts() // from here on
	infos, got, err := raw(small)
	if status.Code(err) != codes.DataLoss || infos != 0 || len(got) != 0 {
		t.Fatalf("small object corrupted on every read: %d infos, %d bytes, %v; want DATA_LOSS before anything is sent", infos, len(got), err)
	}
	if n := proxy.Counts()["GetObject"]; n != 2 {
		t.Fatalf("small object corrupted on every read was read %d times; want 2", n)
	}
	infos, got, err = raw(large)
	if status.Code(err) != codes.DataLoss || infos != 1 || len(got) != len(largeData)-uploader.GetChunk {
		t.Fatalf("large object corrupted: %d infos, %d of %d bytes, %v; want all but the last chunk, then DATA_LOSS", infos, len(got), len(largeData), err)
	}
	// Each corrupted read counts: one, two tries, one.
	if n, _ := testenv.MetricValue(t, tel.Registry(), "bucketlb_upload_corrupt_reads_total", map[string]string{"bucket": st.Buckets[0].GetId()}); n != 4 {
		t.Fatalf("bucketlb_upload_corrupt_reads_total = %v, want 4", n)
	}
	// A range cannot be checked against the object's sha256; it is sent
	// as the bucket answers.
	proxy.SetFor("GetObject", faultproxy.Pass)
	if _, got, err := raw(&uploadv1.GetObjectRequest{BucketId: large.GetBucketId(), Key: large.GetKey(), Offset: 10, Length: 1000}); err != nil || !bytes.Equal(got, largeData[10:1010]) {
		t.Fatalf("range read: %d bytes, %v", len(got), err)
	}
}
