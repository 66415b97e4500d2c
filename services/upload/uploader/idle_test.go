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
	const idle = 300 * time.Millisecond
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
			err := stream.RecvMsg(&uploadv1.UploadResponse{})
			if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), "nothing arrived from the client") {
				t.Fatalf("stalled upload ended with %v; want the server's DEADLINE_EXCEEDED for an idle client", err)
			}
			st.waitNoReservations(t)
			waitHeld(t, st, 0)
			objects, multiparts := st.objects(t)
			if id := st.Buckets[0].GetId(); objects[id] != 0 || multiparts[id] != 0 {
				t.Fatalf("left behind: %d objects, %d open multipart uploads", objects[id], multiparts[id])
			}
			if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != 0 {
				t.Fatalf("an abandoned upload was counted: %v", used)
			}
		})
	}
}

// The idle client is what ends the upload even when an earlier part's PUT
// is still stuck at the bucket: that PUT then fails only because the
// upload ended, and must not turn the answer into a bucket failure.
func TestIdleClientWhilePartIsStuck(t *testing.T) {
	st := startStack(t, 1, func(c *uploader.Config) {
		c.PartSize, c.IdleTimeout, c.BufferParts = 5<<20, 300*time.Millisecond, true
	})
	st.Proxies[st.Buckets[0].GetId()].SetForNext("UploadPart", faultproxy.Stall, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Part 1 whole (its PUT stalls), part 2 begun.
	stream := openUpload(ctx, t, st.Upload, &uploadv1.UploadHeader{Key: "idle/stuck-part", ContentType: "application/octet-stream", Size: 12 << 20},
		testenv.OpaqueBytes(t, 7<<20))
	err := stream.RecvMsg(&uploadv1.UploadResponse{})
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), "nothing arrived from the client") {
		t.Fatalf("upload ended with %v; want the server's DEADLINE_EXCEEDED for an idle client", err)
	}
	st.waitNoReservations(t)
	if objects, multiparts := st.objects(t); objects[st.Buckets[0].GetId()] != 0 || multiparts[st.Buckets[0].GetId()] != 0 {
		t.Fatalf("left behind: %v objects, %v open multipart uploads", objects, multiparts)
	}
}
