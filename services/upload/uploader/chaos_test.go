package uploader_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/health"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// Everything at once, for chaosFor: three buckets whose fault proxies
// switch every 50-200 ms among passing, 5xx, resets, 429s, lost answers,
// stalls, bodies cut short or stalled midway, and corrupted bodies both
// ways; one of two allocator replicas crashes;
// clients upload small and multipart objects, under generated keys and
// under their own keys with idempotency keys, retrying as the Go client
// does, and some abandon their upload midway; readers read back what is
// stored, and a read that ends OK must hold exactly the object's bytes.
// Then the faults stop and:
//   - usage is exactly the sum of the objects clients were told of (each
//     counted once, whatever was retried or replayed);
//   - each of those objects reads back as the bytes sent;
//   - nothing is left silently: every object beyond those, and every open
//     multipart upload, was counted in bucketlb_upload_leftovers_total
//     when its removal failed (a bucket that fails every try of a removal
//     keeps what it was asked to remove).
//
// It found removals that gave up after one try, and the SDK retrying a
// CreateMultipartUpload whose answer was lost, which left an upload open
// that no one knew of.
func TestChaos(t *testing.T) {
	const chaosFor = 12 * time.Second
	gw := testenv.S3(t).Endpoint
	tel := newTelemetry(t, "upload-test")
	st := startReplicatedStack(t, []string{gw, gw, gw}, 2, func(c *allocator.Config) {
		replicaTTLs(c)
		c.Health = health.Policy{CooldownStep: 200 * time.Millisecond, MaxCooldown: time.Second, TrialTimeout: time.Second, FlushEvery: -1}
	}, func(c *uploader.Config) {
		c.PartSize = 5 << 20
		c.CallTimeout, c.DataTimeout = 500*time.Millisecond, 2*time.Second
		c.Metrics = tel.Metrics()
	})
	for _, p := range st.Proxies {
		p.StallFor = time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	stop := make(chan struct{})
	var chaosDone sync.WaitGroup
	chaosDone.Add(1)
	go func() {
		defer chaosDone.Done()
		modes := []faultproxy.Mode{faultproxy.Pass, faultproxy.Pass, faultproxy.Pass, faultproxy.Pass, faultproxy.Error5xx, faultproxy.Reset,
			faultproxy.Throttle, faultproxy.LoseResponse, faultproxy.Stall, faultproxy.Corrupt, faultproxy.StallBody, faultproxy.Truncate,
			faultproxy.CorruptAnswer, faultproxy.RequestTimeout, faultproxy.IncompleteBody}
		rng := rand.New(rand.NewPCG(1, 2))
		for {
			for _, p := range st.Proxies {
				switch m := modes[rng.IntN(len(modes))]; m {
				case faultproxy.CorruptAnswer:
					// Reads only: a write's answer carries no bytes of
					// the object, and TLS rules out flips on R2.
					p.SetFor("GetObject", m)
				default:
					p.Set(m)
				}
			}
			select {
			case <-stop:
				for _, p := range st.Proxies {
					p.Set(faultproxy.Pass)
				}
				return
			case <-time.After(time.Duration(50+rng.IntN(150)) * time.Millisecond):
			}
		}
	}()

	const workers = 4
	dir := t.TempDir()
	var (
		mu      sync.Mutex
		results = map[string]*uploadv1.UploadResponse{}
		failed  []error
	)
	var started atomic.Int32
	var wg sync.WaitGroup
	until := time.Now().Add(chaosFor)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := 0; time.Now().Before(until); i++ {
				started.Add(1)
				size := 1 + rng.IntN(64<<10)
				if rng.IntN(5) == 0 {
					size = 6<<20 + rng.IntN(6<<20)
				}
				data := testenv.OpaqueBytes(t, size)
				if rng.IntN(6) == 0 { // abandoned midway: the client goes
					actx, acancel := context.WithCancel(ctx)
					half := &gatedReader{r: bytes.NewReader(data), left: len(data), open: make(chan struct{})}
					after := time.Duration(rng.IntN(300)) * time.Millisecond
					go func() {
						time.Sleep(after)
						acancel()
						close(half.open)
					}()
					_, _ = uploadclient.Upload(actx, st.Upload, &uploadv1.UploadHeader{NameHint: "gone.bin", ContentType: "application/octet-stream", Size: int64(size) * 2},
						half, uploadclient.Options{ChunkSize: 1 << 20})
					continue
				}
				hdr := &uploadv1.UploadHeader{NameHint: "c.bin", ContentType: "application/octet-stream"}
				if rng.IntN(3) == 0 {
					hdr.Key = fmt.Sprintf("chaos/w%d-%d.bin", w, i)
					hdr.IdempotencyKey = fmt.Sprintf("idem-w%d-%d", w, i)
				}
				path := filepath.Join(dir, fmt.Sprintf("w%d-%d.bin", w, i))
				if err := os.WriteFile(path, data, 0o600); err != nil {
					panic(err)
				}
				resp, err := uploadclient.UploadFile(ctx, st.Upload, path, hdr, uploadclient.Options{Retries: 20, ChunkSize: 1 << 20})
				mu.Lock()
				if err != nil {
					failed = append(failed, fmt.Errorf("%s (%d bytes): %w", filepath.Base(path), size, err))
				} else {
					results[path] = resp
				}
				mu.Unlock()
			}
		}()
	}
	// Readers read back what is stored while the faults go on. A read may
	// fail, but one that ends OK holds exactly the object's bytes,
	// whatever its bucket sent.
	var reads, readsFailed atomic.Int32
	for r := 0; r < 2; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(until) {
				mu.Lock()
				var path string
				var resp *uploadv1.UploadResponse
				for path, resp = range results { // any one
					break
				}
				mu.Unlock()
				if resp == nil {
					select {
					case <-stop:
						return
					case <-time.After(20 * time.Millisecond): // pacing until a first upload is in
					}
					continue
				}
				want, err := os.ReadFile(path)
				if err != nil {
					panic(err)
				}
				_, got, err := rawRead(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()})
				reads.Add(1)
				if err != nil {
					readsFailed.Add(1)
					continue
				}
				if !bytes.Equal(got, want) {
					t.Errorf("%s: a read during the faults ended OK with %d bytes that are not the object's %d", filepath.Base(path), len(got), len(want))
				}
			}
		}()
	}
	// The faults are scheduled, not waited for: a replica crashes a third
	// of the way in, and the faults stop when no new upload starts (those
	// still running finish on healthy buckets).
	crashAt := time.AfterFunc(chaosFor/3, st.Replicas[0].Crash)
	defer crashAt.Stop()
	stopAt := time.AfterFunc(time.Until(until), func() { close(stop) })
	defer stopAt.Stop()
	wg.Wait()
	chaosDone.Wait()
	// Under faults this dense an upload may run out of retries; what it
	// leaves is checked below like everything else.
	for _, err := range failed {
		t.Logf("failed: %v", err)
	}
	t.Logf("%d uploads succeeded, %d failed, of %d started; %d reads during the faults, %d failed", len(results), len(failed), started.Load(), reads.Load(), readsFailed.Load())
	if reads.Load() == 0 {
		t.Error("nothing was read during the faults")
	}
	if len(results) == 0 {
		t.Fatal("no upload succeeded")
	}

	st.waitNoReservations(t)
	used, _ := st.usage(t)
	var usedTotal, want int64
	for _, u := range used {
		usedTotal += u
	}
	perBucket := map[string]int{}
	for _, r := range results {
		want += r.GetSize()
		perBucket[r.GetBucketId()]++
	}
	if usedTotal != want {
		t.Errorf("used %d bytes in all, want %d, the sum of %d objects", usedTotal, want, len(results))
	}
	objects, multiparts := st.objects(t)
	for _, b := range st.Buckets {
		id := b.GetId()
		leftovers := func(kind telemetry.LeftoverKind) int {
			n, _ := testenv.MetricValue(t, tel.Registry(), "bucketlb_upload_leftovers_total", map[string]string{"bucket": id, "kind": string(kind)})
			return int(n)
		}
		objLeft, mpLeft := leftovers(telemetry.LeftoverObject), leftovers(telemetry.LeftoverMultipart)
		t.Logf("bucket %s: %d objects for %d uploads (%d leftovers counted); %d open multipart uploads (%d leftovers counted)",
			id, objects[id], perBucket[id], objLeft, multiparts[id], mpLeft)
		if objects[id] < perBucket[id] || objects[id]-perBucket[id] > objLeft {
			t.Errorf("bucket %s: %d objects for %d uploads and %d counted leftovers", id, objects[id], perBucket[id], objLeft)
		}
		if multiparts[id] > mpLeft {
			t.Errorf("bucket %s: %d open multipart uploads and %d counted leftovers", id, multiparts[id], mpLeft)
		}
	}
	for path, r := range results {
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		readBack(ctx, t, st.Upload, r, want, filepath.Base(path))
	}
}
