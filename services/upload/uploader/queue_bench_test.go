package uploader_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// queuedChunk is what each queued upload sends before it waits.
const queuedChunk = uploader.MaxChunk

// BenchmarkQueuedUploads: an upload waiting for buffer room must keep its
// data in gRPC flow control, not in memory the budget does not count.
// While one upload holds the whole budget, 1,000 uploads from a child
// process each send a header and a 1 MiB chunk. The figure is this
// process's peak live heap meanwhile (the upload service, the allocator,
// etcd and the S3 server). Each queued stream may cost its 128 KiB
// receive window plus the ~27 KiB an idle stream costs; had every one
// taken in its chunk, they would hold 1,000 MiB.
func BenchmarkQueuedUploads(b *testing.B) {
	const queued = 1000
	st := startStack(b, 1, func(c *uploader.Config) {
		c.PartSize, c.BufferBudget = budgetPart, budget
		c.BufferWait, c.IdleTimeout = 5*time.Minute, 5*time.Minute
	})
	release := holdBudget(b, st)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	client := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperQueuedClient$", "-test.count=1")
	client.Env = append(os.Environ(), helperAddrEnv+"="+st.UploadAddr, fmt.Sprintf("%s=%d", helperStreamsEnv, queued))
	client.Stderr = os.Stderr
	stdin, err := client.StdinPipe() // closing it ends the client
	if err != nil {
		b.Fatal(err)
	}
	heap, measureErr := peakLiveHeap(func() error {
		if err := client.Start(); err != nil {
			return err
		}
		for deadline := time.Now().Add(2 * time.Minute); st.Server.BufferWaiters() < queued; {
			if time.Now().After(deadline) {
				return fmt.Errorf("only %d of %d uploads queued for buffers within 2 minutes", st.Server.BufferWaiters(), queued)
			}
			time.Sleep(10 * time.Millisecond)
		}
		// A steady state, not an event, is measured: the queued streams'
		// data keeps arriving until their windows are full.
		time.Sleep(3 * time.Second)
		return nil
	})
	stdin.Close()
	if err := client.Wait(); err != nil {
		b.Fatalf("queued upload client: %v", err)
	}
	if measureErr != nil {
		b.Fatal(measureErr)
	}
	release()
	bound := float64(queued) * (128 + 27) / 1024
	got := float64(heap) / (1 << 20)
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\nuploads queued for buffer room\tbound\tmeasured\tratio\t")
	fmt.Fprintf(tw, "peak live heap, %d uploads queued, each sent a 1 MiB chunk (bound: 128 KiB window + 27 KiB each)\t%.1f MiB\t%.1f MiB\t%.2fx\t\n",
		queued, bound, got, got/bound)
	tw.Flush()
	b.ReportMetric(got, "queued-heap-MiB")
}

// TestHelperQueuedClient is not a test: BenchmarkQueuedUploads runs it in a
// child process. Each stream sends a header and one chunk (a send blocks
// while the server reads nothing), and all wait until stdin closes.
func TestHelperQueuedClient(t *testing.T) {
	addr := os.Getenv(helperAddrEnv)
	if addr == "" {
		t.Skip("runs only as BenchmarkQueuedUploads's client process")
	}
	streams, _ := strconv.Atoi(os.Getenv(helperStreamsEnv))
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := uploadv1.NewUploadServiceClient(conn)
	chunk := testenv.OpaqueBytes(t, queuedChunk)
	ctx := context.Background()
	for i := range streams {
		go func() {
			s, err := c.Upload(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			hdr := &uploadv1.UploadHeader{Key: fmt.Sprintf("queued/%d.bin", i), ContentType: "application/octet-stream", Size: 2 * queuedChunk}
			if err := s.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: hdr}}); err != nil {
				t.Error(err)
				return
			}
			_ = s.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: chunk}})
		}()
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
}
