package uploader_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// sinkS3 answers the S3 calls an upload makes and discards every body, so
// a benchmark against it measures the service's own overhead, not storage.
// Like R2, it answers a write with the body's MD5 as ETag.
func sinkS3(tb testing.TB) string {
	var ids atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := md5.New()
		_, _ = io.Copy(h, r.Body)
		q := r.URL.Query()
		w.Header().Set("ETag", `"`+hex.EncodeToString(h.Sum(nil))+`"`)
		switch {
		case r.Method == http.MethodPost && q.Has("uploads"):
			fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>u%d</UploadId></InitiateMultipartUploadResult>`, ids.Add(1))
		case r.Method == http.MethodPost && q.Has("uploadId"):
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult><ETag>"0123456789abcdef0123456789abcdef-2"</ETag></CompleteMultipartUploadResult>`)
		case r.Method == http.MethodDelete:
			w.WriteHeader(http.StatusNoContent)
		}
	}))
	tb.Cleanup(srv.Close)
	return srv.URL
}

// peakLiveHeap runs fn and meanwhile collects garbage every few
// milliseconds, so each sample is the live heap; it returns the highest
// live heap seen above the level before fn. Slow: measure throughput in a
// separate run.
func peakLiveHeap(fn func() error) (uint64, error) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	var peak uint64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			runtime.GC()
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			if m.HeapAlloc > base {
				peak = max(peak, m.HeapAlloc-base)
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	err := fn()
	close(stop)
	<-done
	return peak, err
}

// BenchmarkServiceOverhead: 256 MiB through the service vs direct SDK
// multipart to a sink S3 endpoint that discards bodies (the service's own
// overhead), S3 requests per upload as R2 would bill them, peak heap per
// large upload, and the heap cost of idle upload streams.
func BenchmarkServiceOverhead(b *testing.B) {
	const size = 256 << 20
	st := startStackAt(b, []string{sinkS3(b)}, nil, nil)
	g := testenv.S3(b)
	proxy := st.Proxies[st.Buckets[0].GetId()]
	store, err := objstore.New(objstore.Options{Credentials: objstore.StaticCredentials{"GW": {g.AccessKey, g.SecretKey}}})
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	spec := st.Buckets[0]
	direct, err := store.Bucket(objstore.Target{ID: spec.GetId(), Name: spec.GetName(), Endpoint: spec.GetEndpoint(), Region: spec.GetRegion(), CredentialsRef: "GW", PathStyle: true})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(b, size)
	hdr := func(n int) *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{NameHint: "b.bin", ContentType: "application/octet-stream", Size: int64(n)}
	}

	t0 := time.Now()
	if err := testenv.DirectMultipart(ctx, direct, "direct", data, 8<<20); err != nil {
		b.Fatal(err)
	}
	directMBs := float64(size) / (1 << 20) / time.Since(t0).Seconds()
	proxy.Counts()
	t0 = time.Now()
	if _, err := send(ctx, st.Upload, hdr(size), data); err != nil {
		b.Fatal(err)
	}
	serviceMBs := float64(size) / (1 << 20) / time.Since(t0).Seconds()
	largeOps := proxy.Counts()
	heap, err := peakLiveHeap(func() error { _, err := send(ctx, st.Upload, hdr(size), data); return err })
	if err != nil {
		b.Fatal(err)
	}
	// The server alone: the client runs in a child process (this test
	// binary, as TestHelperUploadClient), so this process's heap is the
	// upload service's (plus the allocator and the sink, which hold no
	// upload data).
	const concurrent = 4
	client := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperUploadClient$", "-test.count=1")
	client.Env = append(os.Environ(), helperAddrEnv+"="+st.UploadAddr, fmt.Sprintf("%s=%d", helperStreamsEnv, concurrent),
		fmt.Sprintf("%s=%d", helperSizeEnv, 64<<20))
	client.Stdout, client.Stderr = os.Stderr, os.Stderr
	heapServer, err := peakLiveHeap(client.Run)
	if err != nil {
		b.Fatalf("upload client process: %v", err)
	}
	proxy.Counts()
	if _, err := send(ctx, st.Upload, hdr(1024), data[:1024]); err != nil {
		b.Fatal(err)
	}
	smallOps := proxy.Counts()

	// 1,000 idle streams: header sent, no data yet. Each declares 64 KiB,
	// so all fit in the buffer budget (taken before any data is read) and
	// wait for data rather than for room.
	const idle = 1000
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	ictx, icancel := context.WithCancel(ctx)
	for i := 0; i < idle; i++ {
		s, err := st.Upload.Upload(ictx)
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: hdr(64 << 10)}}); err != nil {
			b.Fatal(err)
		}
	}
	// Measure once the server has taken up every header.
	for deadline := time.Now().Add(time.Minute); st.Server.WaitingStreams() < idle; {
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d idle streams reached the server within a minute", st.Server.WaitingStreams(), idle)
		}
		time.Sleep(5 * time.Millisecond)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	icancel()
	// Heap and goroutine stacks: each stream has a handler goroutine and a
	// receiver goroutine on the server, whose stacks the heap leaves out.
	inUse := func(m runtime.MemStats) uint64 { return m.HeapAlloc + m.StackInuse }
	idleMiB := float64(inUse(after)-min(inUse(after), inUse(before))) / (1 << 20)

	// Peak RSS, what the goal is stated in: an upload service alone in its
	// process, as deployed, so the figure also holds the garbage collector's
	// slack and the runtime, which the live heap leaves out. One small
	// upload first opens its connections.
	proc := startServerProcess(b, st.AllocatorAddr)
	pconn, err := grpc.NewClient(proc.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer pconn.Close()
	pc := uploadv1.NewUploadServiceClient(pconn)
	if _, err := send(ctx, pc, hdr(1024), data[:1024]); err != nil {
		b.Fatal(err)
	}
	rssServer, err := proc.peakRSS(b, func(ctx context.Context) error { return uploadConcurrently(ctx, pc, concurrent, data[:64<<20]) })
	if err != nil {
		b.Fatalf("uploads to the upload service process: %v", err)
	}

	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\nupload service vs direct SDK to a sink S3 endpoint\tbaseline\tservice\tratio\t")
	fmt.Fprintf(tw, "256 MiB multipart, MB/s (goal >= 0.6x)\t%.0f\t%.0f\t%.2fx\t\n", directMBs, serviceMBs, serviceMBs/directMBs)
	fmt.Fprintf(tw, "peak live heap, one 256 MiB upload, client and server together (for reference)\t\t%.1f MiB\t\t\n", float64(heap)/(1<<20))
	fmt.Fprintf(tw, "peak RSS per upload, upload service process, %d concurrent 64 MiB uploads (goal <= 2 parts + 1 MiB)\t17.0 MiB\t%.1f MiB\t%.2fx\t\n", concurrent, float64(rssServer)/concurrent/(1<<20), float64(rssServer)/concurrent/(17<<20))
	fmt.Fprintf(tw, "peak live heap per upload, server side, the same uploads (for reference)\t\t%.1f MiB\t\t\n", float64(heapServer)/concurrent/(1<<20))
	fmt.Fprintf(tw, "heap and stacks of %d idle upload streams, client+server (goal <= 64 MiB)\t64.0 MiB\t%.1f MiB\t%.2fx\t\n", idle, idleMiB, idleMiB/64)
	fmt.Fprintf(tw, "S3 requests, 1 KiB upload (goal exactly 1 PUT)\t1\t%d\t\t %v\n", total(smallOps), smallOps)
	fmt.Fprintf(tw, "S3 requests, 256 MiB upload (goal parts+2 = %d)\t%d\t%d\t\t %v\n", size/(8<<20)+2, size/(8<<20)+2, total(largeOps), largeOps)
	tw.Flush()
	b.ReportMetric(serviceMBs/directMBs, "sink-ratio")
	b.ReportMetric(float64(heap)/(1<<20), "peak-heap-MiB")
	b.ReportMetric(float64(rssServer)/concurrent/(1<<20), "server-rss-per-upload-MiB")
	b.ReportMetric(float64(heapServer)/concurrent/(1<<20), "server-heap-per-upload-MiB")
	b.ReportMetric(float64(total(smallOps)), "s3-ops-small")
	b.ReportMetric(float64(total(largeOps)), "s3-ops-large")
}

func total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

const (
	helperAddrEnv    = "BUCKETLB_HELPER_UPLOAD_ADDR"
	helperStreamsEnv = "BUCKETLB_HELPER_UPLOAD_STREAMS"
	helperSizeEnv    = "BUCKETLB_HELPER_UPLOAD_SIZE"
)

// TestHelperUploadClient is not a test: BenchmarkServiceOverhead runs it in
// a child process to upload from outside the measured heap.
func TestHelperUploadClient(t *testing.T) {
	addr := os.Getenv(helperAddrEnv)
	if addr == "" {
		t.Skip("runs only as BenchmarkServiceOverhead's client process")
	}
	streams, _ := strconv.Atoi(os.Getenv(helperStreamsEnv))
	size, _ := strconv.Atoi(os.Getenv(helperSizeEnv))
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := uploadConcurrently(ctx, uploadv1.NewUploadServiceClient(conn), streams, testenv.OpaqueBytes(t, size)); err != nil {
		t.Error(err)
	}
}

// uploadConcurrently uploads data from streams clients at once, with the
// client library's default chunk size, as services would send.
func uploadConcurrently(ctx context.Context, c uploadv1.UploadServiceClient, streams int, data []byte) error {
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for range streams {
		wg.Go(func() {
			if _, err := uploadclient.Upload(ctx, c, &uploadv1.UploadHeader{NameHint: "h.bin", ContentType: "application/octet-stream", Size: int64(len(data))},
				bytes.NewReader(data), uploadclient.Options{}); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	return <-errs
}

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
