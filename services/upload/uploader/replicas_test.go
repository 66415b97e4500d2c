package uploader_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// replicaTTLs make a crashed replica's capacity expire within seconds
// (2 s is the shortest replica lease) and reservations renew several
// times a second.
func replicaTTLs(c *allocator.Config) {
	c.ReplicaLeaseTTL = 2 * time.Second
	c.ReservationTTL = 2 * time.Second
}

// reservationOwners lists the replicas whose blocks hold a reservation in
// etcd. A reservation granted again after its replica died keeps its key
// (and id) but names the replica that holds its bytes now.
func reservationOwners(t *testing.T, st *stack) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := testenv.EtcdClient(t, st.Etcd.Endpoint).Get(ctx, "/bucketlb/cap/res/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var owners []string
	for _, kv := range resp.Kvs {
		_, _, term, err := ledger.ParseReservation(kv.Value)
		if err != nil {
			t.Fatal(err)
		}
		replica, _, _ := strings.Cut(term, ".") // "<replica>.<lease>"
		owners = append(owners, replica)
	}
	return owners
}

// gatedReader gives its data up to at, then waits for open to close.
type gatedReader struct {
	r    io.Reader
	left int // bytes before the gate
	open chan struct{}
}

func (g *gatedReader) Read(p []byte) (int, error) {
	if g.left == 0 {
		<-g.open
		g.left = -1
	}
	if g.left > 0 && len(p) > g.left {
		p = p[:g.left]
	}
	n, err := g.r.Read(p)
	if g.left > 0 {
		g.left -= n
	}
	return n, err
}

// The allocator replica that granted a running multipart upload's
// reservation crashes: no revoke reaches etcd, so its capacity expires
// with its lease. The upload renews and commits through the other replica,
// which grants the reservation again against current capacity (DESIGN
// invariant 2). The upload succeeds, and its bytes are counted once, by
// the survivor, with nothing left reserved or open.
func TestAllocatorReplicaDiesMidUpload(t *testing.T) {
	st := startReplicatedStack(t, []string{testenv.S3(t).Endpoint}, 2, replicaTTLs,
		func(c *uploader.Config) { c.PartSize = 5 << 20 })
	bucket := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 12<<20) // parts of 5, 5 and 2 MiB
	body := &gatedReader{r: bytes.NewReader(data), left: 6 << 20, open: make(chan struct{})}
	open := sync.OnceFunc(func() { close(body.open) })
	t.Cleanup(open)
	type result struct {
		resp *uploadv1.UploadResponse
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := uploadclient.Upload(ctx, st.Upload, &uploadv1.UploadHeader{Key: "crash/mid.bin", ContentType: "application/octet-stream", Size: int64(len(data))},
			body, uploadclient.Options{ChunkSize: 1 << 20})
		done <- result{resp, err}
	}()

	var owners []string
	poll(t, 10*time.Second, "the upload's reservation", func() bool {
		owners = reservationOwners(t, st)
		return len(owners) == 1
	})
	var granter *allocReplica
	for _, r := range st.Replicas {
		if r.ID == owners[0] {
			granter = r
		}
	}
	if granter == nil {
		t.Fatalf("reservation owned by %q, not one of the replicas", owners[0])
	}
	crashed := time.Now()
	granter.Crash()
	t.Logf("crash took %s", time.Since(crashed))
	// The crashed replica's lease expires; what reservation there is now
	// was granted again by the survivor on a Renew.
	poll(t, 10*time.Second, "the survivor to hold the reservation", func() bool {
		owners = reservationOwners(t, st)
		return len(owners) == 1 && owners[0] != granter.ID
	})
	t.Logf("the survivor holds the reservation %s after the crash", time.Since(crashed).Round(time.Millisecond))
	open()

	res := <-done
	t.Logf("upload done %s after the crash", time.Since(crashed).Round(time.Millisecond))
	if res.err != nil {
		t.Fatalf("upload after its allocator replica crashed: %v", res.err)
	}
	sum := sha256.Sum256(data)
	if res.resp.GetSha256() != hex.EncodeToString(sum[:]) || res.resp.GetSize() != int64(len(data)) {
		t.Fatalf("response %v does not describe the data", res.resp)
	}
	st.waitNoReservations(t)
	if used, _ := st.usage(t); used[bucket] != int64(len(data)) {
		t.Fatalf("used %d bytes, want %d: counted once", used[bucket], len(data))
	}
	if objects, multiparts := st.objects(t); objects[bucket] != 1 || multiparts[bucket] != 0 {
		t.Fatalf("%d objects and %d open multipart uploads, want 1 and 0", objects[bucket], multiparts[bucket])
	}
	readBack(ctx, t, st.Upload, res.resp, data, "the object")
}

// Clients keep uploading, each retrying as the Go client does, while one
// of two allocator replicas crashes under them. Every upload ends in
// success; usage is the sum of the objects, each counted exactly once;
// every object left in the bucket is one a client was told about, and
// reads back as its bytes.
func TestUploadsSurviveAllocatorReplicaCrash(t *testing.T) {
	st := startReplicatedStack(t, []string{testenv.S3(t).Endpoint}, 2, replicaTTLs, nil)
	bucket := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const workers, each = 8, 12
	dir := t.TempDir()
	var (
		mu      sync.Mutex
		results = map[string]*uploadv1.UploadResponse{} // by file
		errs    []error
	)
	var finished, retries atomic.Int32
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				path := filepath.Join(dir, fmt.Sprintf("w%d-%d.bin", w, i))
				if err := os.WriteFile(path, testenv.OpaqueBytes(t, 1024+(w*each+i)*997), 0o600); err != nil {
					panic(err)
				}
				resp, err := uploadclient.UploadFile(ctx, st.Upload, path, &uploadv1.UploadHeader{NameHint: "f.bin", ContentType: "application/octet-stream"},
					uploadclient.Options{Retries: 8, OnRetry: func(_ int, err error, _ time.Duration) {
						if retries.Add(1) == 1 {
							t.Logf("first retry after: %v", err)
						}
					}})
				mu.Lock()
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", filepath.Base(path), err))
				} else {
					results[path] = resp
				}
				mu.Unlock()
				finished.Add(1)
			}
		}()
	}
	poll(t, time.Minute, "third of the uploads finished", func() bool { return finished.Load() >= workers*each/3 })
	st.Replicas[0].Crash()
	crashedAt := finished.Load()
	wg.Wait()
	t.Logf("%d uploads finished before the crash, %d after; %d retries", crashedAt, workers*each-int(crashedAt), retries.Load())
	if len(errs) > 0 {
		t.Fatalf("%d of %d uploads failed; first: %v", len(errs), workers*each, errs[0])
	}
	// The upload service retries what the crash cut off on the other
	// replica, so no client had to.
	if n := retries.Load(); n > 0 {
		t.Errorf("clients retried %d times", n)
	}

	st.waitNoReservations(t)
	var want int64
	for _, r := range results {
		want += r.GetSize()
	}
	if used, _ := st.usage(t); used[bucket] != want {
		t.Fatalf("used %d bytes, want %d, the sum of %d objects", used[bucket], want, len(results))
	}
	if objects, multiparts := st.objects(t); objects[bucket] != len(results) || multiparts[bucket] != 0 {
		t.Fatalf("%d objects and %d open multipart uploads, want %d and 0", objects[bucket], multiparts[bucket], len(results))
	}
	for path, r := range results {
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		readBack(ctx, t, st.Upload, r, want, filepath.Base(path))
	}
}

// An allocator replica stopped as on SIGTERM in a rolling restart keeps
// serving the calls that reach it while it drains: uploads running
// through it all succeed, and each is counted once. The connection here
// does not retry, so a call the draining replica failed would fail its
// upload. (Its capacity lease used to end at the signal, so calls in the
// drain failed "the allocator cannot reach etcd", and only the retries
// hid it, until throttled.)
func TestAllocatorDrainIsInvisible(t *testing.T) {
	st := startReplicatedStackWith(t, []string{testenv.S3(t).Endpoint}, 2, replicaTTLs, nil, `{"loadBalancingConfig": [{"round_robin": {}}]}`)
	bucket := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var (
		mu    sync.Mutex
		sizes []int64
		errs  []error
		stop  = make(chan struct{})
		wg    sync.WaitGroup
	)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				data := testenv.OpaqueBytes(t, 1000+(w*7919+i*997)%20_000)
				_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "d.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					sizes = append(sizes, int64(len(data)))
				}
				mu.Unlock()
			}
		}()
	}
	done := func() int { mu.Lock(); defer mu.Unlock(); return len(sizes) + len(errs) }
	poll(t, 30*time.Second, "uploads under way", func() bool { return done() >= 20 })
	st.Replicas[0].Stop()
	stoppedAt := done()
	poll(t, 30*time.Second, "uploads after the stop", func() bool { return done() >= stoppedAt+20 })
	close(stop)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d of %d uploads failed while a replica drained; first: %v", len(errs), len(errs)+len(sizes), errs[0])
	}
	st.waitNoReservations(t)
	var want int64
	for _, n := range sizes {
		want += n
	}
	if used, _ := st.usage(t); used[bucket] != want {
		t.Fatalf("used %d bytes, want %d, the sum of %d objects", used[bucket], want, len(sizes))
	}
}

// With every allocator replica gone, an upload and a read that needs a
// bucket looked up fail at once, UNAVAILABLE with a retry delay, in a
// sentence that names the allocator rather than a connection, and the
// upload stores nothing.
func TestNoAllocatorLeft(t *testing.T) {
	st := startReplicatedStack(t, []string{testenv.S3(t).Endpoint}, 2, replicaTTLs, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, r := range st.Replicas {
		r.Crash()
	}
	data := testenv.OpaqueBytes(t, 1024)
	_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "a.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
	wantUnreachable(t, err, "nothing was stored")
	_, _, err = read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: st.Buckets[0].GetId(), Key: "a.bin"})
	wantUnreachable(t, err, "the bucket could not be looked up")
	if objects, multiparts := st.objects(t); objects[st.Buckets[0].GetId()] != 0 || multiparts[st.Buckets[0].GetId()] != 0 {
		t.Fatalf("%v objects and %v multipart uploads stored without an allocator", objects, multiparts)
	}
}

func wantUnreachable(t *testing.T, err error, consequence string) {
	t.Helper()
	st := status.Convert(err)
	if st.Code() != codes.Unavailable || !hasRetryInfo(err) ||
		!strings.HasPrefix(st.Message(), "the allocator could not be reached") || !strings.Contains(st.Message(), consequence) {
		t.Fatalf("got %v (retry delay %v), want UNAVAILABLE with a retry delay saying the allocator could not be reached and %s", err, hasRetryInfo(err), consequence)
	}
	noConnectionText(t, st.Message())
}

// noConnectionText fails when a client's message carries gRPC's text about
// its retries or connections (and with it the addresses inside the
// system) rather than only the allocator's or the service's sentence.
func noConnectionText(t *testing.T, msg string) {
	t.Helper()
	for _, s := range []string{"max retries exhausted", "rpc error", "desc =", "dial tcp", "transport:"} {
		if strings.Contains(msg, s) {
			t.Fatalf("the client was told %q, which carries gRPC's own text (%q)", msg, s)
		}
	}
}

// An allocator that cannot reach etcd refuses uploads in its own words,
// which reach the client as they are after gRPC's retries on the other
// replicas: not behind "max retries exhausted: failed after 3 attempts:
// rpc error: code = Unavailable desc = ".
func TestEtcdOutageIsToldInTheAllocatorsWords(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st.Etcd.Close()
	data := testenv.OpaqueBytes(t, 1024)
	_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "a.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
	msg := status.Convert(err).Message()
	if status.Code(err) != codes.Unavailable || !hasRetryInfo(err) || !strings.HasPrefix(msg, "the allocator cannot reach etcd") {
		t.Fatalf("upload while etcd is down: %v, want UNAVAILABLE with a retry delay, in the allocator's words", err)
	}
	noConnectionText(t, msg)
}

// When no bucket is healthy, every replica would say so (health is shared):
// the allocator tells the caller's retry policy not to ask another replica,
// so one upload costs one Allocate, not three.
func TestNoHealthyBucketIsAskedOnce(t *testing.T) {
	tel := newTelemetry(t, "allocator-test")
	st := startReplicatedStack(t, []string{testenv.S3(t).Endpoint}, 2, func(c *allocator.Config) {
		replicaTTLs(c)
		c.Metrics = tel.Metrics()
	}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1024)
	upload := func() error {
		_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "a.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
		return err
	}
	// A bucket cooling down takes no upload: "no healthy bucket" until
	// its cooldown ends. Three failed uploads start it.
	st.Proxies[st.Buckets[0].GetName()].Set(faultproxy.Error5xx)
	for range 3 {
		if err := upload(); err == nil {
			t.Fatal("an upload to a failing bucket succeeded")
		}
	}
	st.Proxies[st.Buckets[0].GetName()].Set(faultproxy.Pass)
	// Both replicas see the state within their watch's delay; calls
	// alternate between them, so four refusals in a row are both.
	inARow := 0
	poll(t, 10*time.Second, "refusals from both replicas", func() bool {
		if strings.Contains(status.Convert(upload()).Message(), "no healthy bucket") {
			inARow++
		} else {
			inARow = 0
		}
		return inARow == 4
	})
	refused := func() float64 {
		n, _ := testenv.MetricValue(t, tel.Registry(), "bucketlb_allocator_reservations_total", map[string]string{"outcome": "unavailable"})
		return n
	}
	before := refused()
	if err := upload(); status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "no healthy bucket") {
		t.Fatalf("upload with the only bucket cooling down: %v", err)
	}
	if n := refused() - before; n != 1 {
		t.Fatalf("one upload made %v Allocate calls that found no healthy bucket, want 1", n)
	}
}
