package uploader_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// One client's running uploads may declare at most ClientInFlightBytes
// together: a client that keeps a large upload alive (trickling just above
// MinDataRate) cannot hold every bucket's room. A second upload past the
// bound is refused before anything is reserved, with RetryInfo; another
// client is not affected, and the room comes back when the first ends.
func TestClientInFlightBytesAreBounded(t *testing.T) {
	st := startStack(t, 1, func(c *uploader.Config) {
		c.ClientInFlightBytes = 30 << 20
		// The slow upload below sends one chunk and then nothing: neither
		// timeout may end it on a loaded machine before the test is done.
		c.IdleTimeout, c.MinDataRate = 2*time.Minute, -1
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	as := func(client string) context.Context {
		return metadata.AppendToOutgoingContext(ctx, "x-client-id", client)
	}
	header := func(size int64) *uploadv1.UploadRequest {
		return &uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: &uploadv1.UploadHeader{
			NameHint: "big.bin", ContentType: "application/octet-stream", Size: size}}}
	}
	data := testenv.OpaqueBytes(t, 4096)
	// The slow client: 20 MiB declared, a first chunk sent, then nothing.
	slow, err := st.Upload.Upload(as("slow"))
	if err != nil {
		t.Fatal(err)
	}
	if err := slow.Send(header(20 << 20)); err != nil {
		t.Fatal(err)
	}
	if err := slow.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: data}}); err != nil {
		t.Fatal(err)
	}
	// Its bytes are counted before they are reserved: once the allocator
	// holds them, the bound counts them too.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, reserved := st.usage(t)
		var n int64
		for _, b := range reserved {
			n += b
		}
		if n >= 20<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the slow upload reserved %d bytes, want its 20 MiB", n)
		}
	}
	small := func(client string, size int) error {
		s, err := st.Upload.Upload(as(client))
		if err != nil {
			return err
		}
		if err := s.Send(header(int64(size))); err != nil {
			return err
		}
		body := testenv.OpaqueBytes(t, size)
		for len(body) > 0 {
			n := min(len(body), 512<<10)
			if err := s.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: body[:n]}}); err != nil {
				break // the answer says why
			}
			body = body[n:]
		}
		_, err = s.CloseAndRecv()
		return err
	}
	// 20 MiB + 12 MiB > 30 MiB: refused, saying when to retry. The slow
	// upload is still running, so this needs no wait.
	err = small("slow", 12<<20)
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a second upload past the client's bound: %v, want RESOURCE_EXHAUSTED", err)
	}
	// It suggests waiting long enough for a dead connection's upload to be
	// dropped, not a second.
	if d := retryDelay(err); d <= time.Second {
		t.Errorf("the refusal suggests retrying in %v: %v", d, err)
	}
	// An upload larger than the bound by itself is refused for good.
	if err := small("other", 31<<20); status.Code(err) != codes.ResourceExhausted || retryDelay(err) != 0 {
		t.Errorf("an upload over the bound alone: %v (retry in %v), want RESOURCE_EXHAUSTED without RetryInfo", err, retryDelay(err))
	}
	if err := small("slow", 4<<20); err != nil {
		t.Fatalf("an upload within the client's bound: %v", err)
	}
	if err := small("other", 12<<20); err != nil {
		t.Fatalf("another client's upload: %v", err)
	}
	// The slow upload ends (its client goes): its bytes no longer count.
	if err := slow.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := slow.CloseAndRecv(); err == nil {
		t.Fatal("the slow upload, ended short, succeeded")
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		err := small("slow", 12<<20)
		if err == nil {
			break
		}
		if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
			t.Fatalf("the client's bound after its slow upload ended: %v", err)
		}
	}
}

// retryDelay is the RetryInfo delay of err's status, 0 without one.
func retryDelay(err error) time.Duration {
	for _, d := range status.Convert(err).Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.GetRetryDelay().AsDuration()
		}
	}
	return 0
}
