package uploader_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// A client that stops sending is cut off after the idle timeout with
// DEADLINE_EXCEEDED, whether it stalls before any data, inside a small
// object or in the middle of a multipart upload; its reservation and
// buffers return and nothing is left in the bucket.
func TestIdleClientIsCutOff(t *testing.T) {
	// Long enough that sending the first 7 MiB never pauses that long on a
	// loaded machine (300 ms did once in CI, cutting the client off while
	// it was still sending).
	const idle = time.Second
	st := startStack(t, 1, func(c *uploader.Config) {
		c.PartSize, c.IdleTimeout = 5<<20, idle
	})
	cases := []struct {
		name       string
		size, sent int
	}{
		{"header only", 1 << 20, 0},
		{"small object", 1 << 20, 256 << 10},
		{"multipart", 12 << 20, 7 << 20},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// The client's own deadline is far beyond the idle timeout, so
			// the status can only come from the server giving up.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			stream := openUpload(ctx, t, st.Upload, &uploadv1.UploadHeader{
				Key: "idle/" + strings.ReplaceAll(tc.name, " ", "-"), ContentType: "application/octet-stream", Size: int64(tc.size)},
				testenv.OpaqueBytes(t, tc.sent))
			// No CloseSend: the client is alive but sends nothing more.
			wantCutOff(t, st, stream, "nothing arrived from the client")
		})
	}
}

// The idle client is what ends the upload even when an earlier part's PUT
// is still stuck at the bucket: that PUT then fails only because the
// upload ended, and must not turn the answer into a bucket failure.
func TestIdleClientWhilePartIsStuck(t *testing.T) {
	st := startStack(t, 1, func(c *uploader.Config) {
		c.PartSize, c.IdleTimeout, c.BufferParts = 5<<20, time.Second, true // see TestIdleClientIsCutOff
	})
	st.Proxies[st.Buckets[0].GetId()].SetForNext("UploadPart", faultproxy.Stall, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Part 1 whole (its PUT stalls), part 2 begun.
	stream := openUpload(ctx, t, st.Upload, &uploadv1.UploadHeader{Key: "idle/stuck-part", ContentType: "application/octet-stream", Size: 12 << 20},
		testenv.OpaqueBytes(t, 7<<20))
	wantCutOff(t, st, stream, "nothing arrived from the client")
}

// A client that keeps the stream alive but sends almost nothing (a byte,
// or an empty chunk, every 20 ms) is cut off once a window of the idle
// timeout brought less than the minimum data rate, with DEADLINE_EXCEEDED,
// in a small object and in the middle of a multipart upload; nothing is
// left behind. A client well above the rate is not.
func TestTricklingClientIsCutOff(t *testing.T) {
	// A window of 1 s at 1 KiB/s: the steady client below would have to
	// stall for a whole second to fall under it.
	const idle = time.Second
	st := startStack(t, 1, func(c *uploader.Config) {
		c.PartSize, c.IdleTimeout = 5<<20, idle
	})
	trickle := func(ctx context.Context, stream uploadv1.UploadService_UploadClient, chunk []byte, every time.Duration, n int) {
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i := 0; i < n; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: chunk}}) != nil {
				return // the server ended the stream
			}
		}
		_ = stream.CloseSend()
	}
	cases := []struct {
		name       string
		size, sent int
		chunk      []byte
	}{
		{"empty chunks, small object", 1 << 20, 4096, nil},
		{"a byte at a time, small object", 1 << 20, 4096, []byte{'x'}},
		{"a byte at a time, multipart", 12 << 20, 7 << 20, []byte{'x'}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			stream := openUpload(ctx, t, st.Upload, &uploadv1.UploadHeader{
				Key: "trickle/" + strings.ReplaceAll(tc.name, " ", "-"), ContentType: "application/octet-stream", Size: int64(tc.size)},
				testenv.OpaqueBytes(t, tc.sent))
			go trickle(ctx, stream, tc.chunk, 20*time.Millisecond, 1000)
			wantCutOff(t, st, stream, "under the minimum")
		})
	}
	t.Run("well above the rate", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// 512 bytes every 30 ms: 16 times the minimum, over four windows.
		data := testenv.OpaqueBytes(t, 40*512)
		stream := openUpload(ctx, t, st.Upload, &uploadv1.UploadHeader{Key: "trickle/steady", ContentType: "application/octet-stream", Size: int64(len(data))}, nil)
		tick := time.NewTicker(30 * time.Millisecond)
		defer tick.Stop()
		for off := 0; off < len(data); off += 512 {
			<-tick.C
			if err := stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: data[off : off+512]}}); err != nil {
				t.Fatalf("send at %d: %v", off, err)
			}
		}
		resp, err := stream.CloseAndRecv()
		if err != nil {
			t.Fatalf("steady upload at 16 times the minimum rate: %v", err)
		}
		readBack(ctx, t, st.Upload, resp, data, "steady upload")
	})
}

// wantCutOff checks that the server ended stream with DEADLINE_EXCEEDED
// saying why, and that the upload left nothing behind: no reservation, no
// buffers, no object or open multipart upload, no usage.
func wantCutOff(t *testing.T, st *stack, stream uploadv1.UploadService_UploadClient, why string) {
	t.Helper()
	err := stream.RecvMsg(&uploadv1.UploadResponse{})
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), why) {
		t.Fatalf("upload ended with %v; want the server's DEADLINE_EXCEEDED saying %q", err, why)
	}
	st.waitNoReservations(t)
	waitHeld(t, st, 0)
	id := st.Buckets[0].GetId()
	if objects, multiparts := st.objects(t); objects[id] != 0 || multiparts[id] != 0 {
		t.Fatalf("left behind: %d objects, %d open multipart uploads", objects[id], multiparts[id])
	}
	if used, _ := st.usage(t); used[id] != 0 {
		t.Fatalf("an abandoned upload was counted: %v", used)
	}
}
