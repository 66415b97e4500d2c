package uploader_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// A part that fails once on the way to the bucket is sent again, and the
// object reads back intact. Corrupted: a streamed part is caught by its
// ETag (the MD5 the store computed) differing from the MD5 of the bytes
// received, a buffered part by the store refusing its Content-MD5
// (BadDigest). Reset or 5xx: a streamed part, which the SDK cannot rewind,
// is retried from the part buffer; a buffered one by the SDK itself.
func TestFailedPartIsSentAgain(t *testing.T) {
	for _, buffered := range []bool{false, true} {
		t.Run(map[bool]string{false: "streamed", true: "buffered"}[buffered], func(t *testing.T) {
			// No stall may add a request: only the fault does.
			st := startStack(t, 1, func(c *uploader.Config) { c.PartSize, c.BufferParts, c.StreamStall = 5<<20, buffered, time.Minute })
			id := st.Buckets[0].GetId()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			data := testenv.OpaqueBytes(t, 12<<20)
			for _, fault := range []faultproxy.Mode{faultproxy.Corrupt, faultproxy.Reset, faultproxy.Error5xx} {
				st.Proxies[id].Counts()
				st.Proxies[id].SetForNext("UploadPart", fault, 1)
				resp, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "c.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
				if err != nil {
					t.Fatalf("fault %d: %v", fault, err)
				}
				if n := st.Proxies[id].Counts()["UploadPart"]; n != 4 {
					t.Fatalf("fault %d: %d UploadPart requests, want 4: 3 parts and the failed one again", fault, n)
				}
				readBack(ctx, t, st.Upload, resp, data, fmt.Sprintf("fault %d", fault))
			}
		})
	}
}

// pausingReader is a client that stops sending for a while after `after`
// bytes, as a slow or bursty producer does.
type pausingReader struct {
	r      io.Reader
	after  int
	pause  time.Duration
	read   int
	paused bool
}

func (p *pausingReader) Read(b []byte) (int, error) {
	if !p.paused && p.read >= p.after {
		p.paused = true
		time.Sleep(p.pause)
	}
	if !p.paused {
		b = b[:min(len(b), p.after-p.read)]
	}
	n, err := p.r.Read(b)
	p.read += n
	return n, err
}

// A client that pauses in the middle of a streamed part does not hold the
// part's PUT open: after StreamStall the PUT is abandoned, the part is sent
// once whole, and the rest of the upload goes buffered. The object is
// intact and nothing is left behind.
func TestStalledClientFallsBackToBufferedParts(t *testing.T) {
	const stall = 100 * time.Millisecond
	st := startStack(t, 1, func(c *uploader.Config) { c.PartSize, c.StreamStall = 5<<20, stall })
	id := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 12<<20)
	st.Proxies[id].Counts()
	// The pause falls 1 MiB into part 2.
	body := &pausingReader{r: bytes.NewReader(data), after: 6 << 20, pause: 10 * stall}
	resp, err := uploadclient.Upload(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "s.bin", ContentType: "application/octet-stream", Size: int64(len(data))},
		body, uploadclient.Options{ChunkSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	// 3 parts, plus the abandoned streamed attempt of part 2 (more if the
	// race detector's pace stalled another).
	if n := st.Proxies[id].Counts()["UploadPart"]; n < 4 {
		t.Fatalf("%d UploadPart requests, want at least 4: the stalled part's PUT must be abandoned and the part sent again", n)
	}
	readBack(ctx, t, st.Upload, resp, data, "stalled upload")
	if _, multiparts := st.objects(t); multiparts[id] != 0 {
		t.Fatalf("%d open multipart uploads left", multiparts[id])
	}
}

// failureReports counts the bucket failures the upload service reports,
// and keeps the write latency its Commits carry.
type failureReports struct {
	uploader.Allocator
	mu      sync.Mutex
	got     []string
	latency time.Duration
}

func (f *failureReports) Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error) {
	f.mu.Lock()
	f.latency = in.GetWriteLatency().AsDuration()
	f.mu.Unlock()
	return f.Allocator.Commit(ctx, in, opts...)
}

func (f *failureReports) ReportOutcome(ctx context.Context, in *allocatorv1.ReportOutcomeRequest, opts ...grpc.CallOption) (*allocatorv1.ReportOutcomeResponse, error) {
	if in.GetOutcome() != allocatorv1.Outcome_OUTCOME_SUCCESS {
		f.mu.Lock()
		f.got = append(f.got, in.GetOutcome().String()+": "+in.GetError())
		f.mu.Unlock()
	}
	return f.Allocator.ReportOutcome(ctx, in, opts...)
}

// A client that sends steadily, far more often than StreamStall, but too
// slowly for a part to arrive within the data timeout makes a streamed
// part's PUT time out waiting for its bytes. That is the client's pace:
// the bucket is not blamed (before, each such part reported a timeout,
// and three in a row cooled a healthy bucket down on every replica), and
// the rest of the parts go buffered. Nor does its pace count as the
// bucket's latency: the write latency the Commit reports is the bucket's
// time per request (before, the upload's whole time over its requests).
func TestSlowSteadyClientIsNotTheBucketsFault(t *testing.T) {
	reports := &failureReports{}
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil,
		func(c *uploader.Config) { c.PartSize, c.DataTimeout = 5<<20, time.Second },
		func(a uploader.Allocator) uploader.Allocator { reports.Allocator = a; return reports })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 11<<20)
	tick := time.NewTicker(100 * time.Millisecond) // 256 KiB at a time: a part in 2 s
	defer tick.Stop()
	start := time.Now()
	resp, err := uploadclient.Upload(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "slow.bin", ContentType: "application/octet-stream", Size: int64(len(data))},
		&pacedReader{r: bytes.NewReader(data), chunk: 256 << 10, tick: tick.C}, uploadclient.Options{ChunkSize: 256 << 10})
	if err != nil {
		t.Fatalf("slow upload: %v", err)
	}
	took := time.Since(start)
	readBack(ctx, t, st.Upload, resp, data, "slow upload")
	reports.mu.Lock()
	defer reports.mu.Unlock()
	if len(reports.got) != 0 {
		t.Fatalf("a slow client's upload reported %d bucket failures: %q", len(reports.got), reports.got)
	}
	// 4 requests (3 parts and the completion) over an upload the client
	// paced to about 4.5 s: its pace alone would make it about a quarter.
	if reports.latency <= 0 || reports.latency > took/8 {
		t.Fatalf("write latency %v reported for an upload the client took %v over: it includes the client's pace", reports.latency, took)
	}
}

// A Complete the bucket refuses outright once (HTTP 500, or 429 slowing
// down: it did not happen) is sent again, as a part would be: the upload
// is stored and counted once, not thrown away with all its bytes.
func TestOneRefusedCompleteIsSentAgain(t *testing.T) {
	for _, mode := range []faultproxy.Mode{faultproxy.Error5xx, faultproxy.Throttle} {
		st := startStack(t, 1, func(c *uploader.Config) { c.PartSize = 5 << 20 })
		id := st.Buckets[0].GetId()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		data := testenv.OpaqueBytes(t, 12<<20)
		st.Proxies[id].SetForNext("CompleteMultipartUpload", mode, 1)
		resp, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "c.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
		if err != nil {
			cancel()
			t.Fatalf("upload whose Complete was refused once (mode %v): %v", mode, err)
		}
		if _, got, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read back: %d bytes, %v", len(got), err)
		}
		if used, _ := st.usage(t); used[id] != int64(len(data)) {
			t.Fatalf("usage %v, want the %d bytes once", used, len(data))
		}
		cancel()
	}
}
