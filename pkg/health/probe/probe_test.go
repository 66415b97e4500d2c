package probe_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/health"
	"github.com/bucketlb/bucketlb/pkg/health/probe"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

type clock struct{ ns atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// targets maps bucket IDs to where they live; tests move a bucket from a
// dead endpoint to the real gateway to "revive" it.
type targets struct {
	mu sync.Mutex
	m  map[string]objstore.Target
}

func (t *targets) get(id string) (objstore.Target, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	v, ok := t.m[id]
	return v, ok
}

func (t *targets) set(id string, v objstore.Target) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.m[id] = v
}

// counting counts probes per bucket.
type counting struct {
	probe.Prober
	mu sync.Mutex
	n  map[string]int
}

func (c *counting) Probe(ctx context.Context, id string) error {
	c.mu.Lock()
	c.n[id]++
	c.mu.Unlock()
	return c.Prober.Probe(ctx, id)
}

func (c *counting) count(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[id]
}

// Probes through the real S3 gateway: a bucket that does not answer cools
// down after three probes and is not probed while cooling; after the
// cooldown exactly one probe (of two overlapping jobs) takes the
// half-open trial, and its success restores the bucket. A healthy bucket
// stays healthy with a measured latency.
func TestProbesDriveHealth(t *testing.T) {
	gw := testenv.S3(t)
	name := testenv.NewBucket(t, gw)
	_, cli := testenv.Etcd(t)
	store, err := objstore.New(objstore.Options{Credentials: objstore.StaticCredentials{"R": {gw.AccessKey, gw.SecretKey}}, CallTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	live := objstore.Target{ID: "alive", Name: name, Endpoint: gw.Endpoint, Region: gw.Region, CredentialsRef: "R", PathStyle: true}
	dead := live
	dead.ID, dead.Endpoint = "dead", "http://127.0.0.1:1" // nothing listens there
	keyless := live
	keyless.ID, keyless.CredentialsRef = "keyless", "NOT-HERE" // keys the allocator lacks
	tg := &targets{m: map[string]objstore.Target{"alive": live, "dead": dead, "keyless": keyless}}
	clk := &clock{}
	clk.ns.Store(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).UnixNano())
	hs := health.NewStore(cli, "", clk.Now, health.Policy{})
	pr := &counting{Prober: probe.ReadProber{Store: store, Target: tg.get}, n: map[string]int{}}
	job := &probe.Job{Health: hs, Prober: pr, Buckets: func() []string { return []string{"alive", "dead", "unknown", "keyless"} }, Timeout: 2 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	for i := 0; i < 3; i++ {
		job.Run(ctx)
	}
	rec := func(id string) health.Record {
		r, _ := hs.Cached(id)
		return r
	}
	if r := rec("dead"); r.Failures != 3 || !r.CoolingDown(clk.Now(), hs.Policy()) {
		t.Fatalf("dead bucket after 3 probes: %+v, want cooling down", r)
	}
	// Not this bucket's fault: nothing is reported about it.
	for _, id := range []string{"unknown", "keyless"} {
		if r := rec(id); r.Failures != 0 || len(r.Recent) != 0 {
			t.Fatalf("%s bucket after 3 probes: %+v, want nothing recorded", id, r)
		}
	}
	if r := rec("alive"); r.Failures != 0 || len(r.Recent) != 3 || r.Latency() <= 0 || r.Score() != 100 {
		t.Fatalf("alive bucket after 3 probes: %+v, want healthy with latency", r)
	}
	job.Run(ctx)
	if n := pr.count("dead"); n != 3 {
		t.Fatalf("dead bucket probed %d times; a cooling bucket must not be probed", n)
	}

	// Cooldown over, the bucket is back: two overlapping jobs (an old and
	// a new leader) probe it once between them, and that trial restores it.
	// keyless cooled down by earlier probes (of a replica with its keys):
	// a probe here that cannot ask gives the trial back at once.
	for i := 0; i < 3; i++ {
		if _, err := hs.ReportProbe(ctx, "keyless", false, time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	clk.advance(15 * time.Minute)
	live.ID = "dead"
	tg.set("dead", live)
	other := *job
	var wg sync.WaitGroup
	for _, j := range []*probe.Job{job, &other} {
		wg.Add(1)
		go func() { defer wg.Done(); j.Run(ctx) }()
	}
	wg.Wait()
	if n := pr.count("dead"); n != 4 {
		t.Fatalf("dead bucket probed %d times after cooldown, want exactly 1 trial (4 in all)", n)
	}
	if r := rec("dead"); r.Failures != 0 || r.CoolingDown(clk.Now(), hs.Policy()) {
		t.Fatalf("revived bucket after its trial: %+v, want healthy", r)
	}
	if ok, err := hs.Admit(ctx, "dead"); err != nil || !ok {
		t.Fatalf("revived bucket does not take traffic: %v, %v", ok, err)
	}
	if ok, err := hs.Admit(ctx, "keyless"); err != nil || !ok {
		t.Fatalf("keyless bucket's trial is held by a probe that could not ask it: %v, %v", ok, err)
	}
}

// A job whose context ends (leadership lost) returns promptly and
// reports nothing about probes it cut short.
func TestCancelledRunReportsNothing(t *testing.T) {
	_, cli := testenv.Etcd(t)
	hs := health.NewStore(cli, "", nil, health.Policy{})
	block := proberFunc(func(ctx context.Context, _ string) error { <-ctx.Done(); return ctx.Err() })
	job := &probe.Job{Health: hs, Prober: block, Buckets: func() []string { return []string{"a", "b"} }, Timeout: time.Minute}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); job.Run(ctx) }()
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
	for _, id := range []string{"a", "b"} {
		if r, ok := hs.Cached(id); ok {
			t.Fatalf("bucket %s got a report from a cancelled probe: %+v", id, r)
		}
	}
}

type proberFunc func(ctx context.Context, id string) error

func (f proberFunc) Probe(ctx context.Context, id string) error { return f(ctx, id) }

// A probe passes when the bucket answers, whether or not the probe key
// exists (even empty), and fails when the bucket is gone or refuses our
// key: a deleted bucket must not pass as a missing key.
func TestReadProberTellsAMissingBucketFromAMissingKey(t *testing.T) {
	gw := testenv.S3(t)
	name := testenv.NewBucket(t, gw)
	store, err := objstore.New(objstore.Options{Credentials: objstore.StaticCredentials{
		"R": {gw.AccessKey, gw.SecretKey}, "BAD": {gw.AccessKey, "not-the-secret"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	live := objstore.Target{ID: "live", Name: name, Endpoint: gw.Endpoint, Region: gw.Region, CredentialsRef: "R", PathStyle: true}
	gone, refused, notS3 := live, live, live
	gone.ID, gone.Name = "gone", "no-such-bucket-"+name
	refused.ID, refused.CredentialsRef = "refused", "BAD"
	bare404 := httptest.NewServer(http.NotFoundHandler()) // a host that is not S3
	defer bare404.Close()
	notS3.ID, notS3.Endpoint = "not-s3", bare404.URL
	tg := &targets{m: map[string]objstore.Target{"live": live, "gone": gone, "refused": refused, "not-s3": notS3}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pr := probe.ReadProber{Store: store, Target: tg.get}
	if err := pr.Probe(ctx, "live"); err != nil {
		t.Fatalf("live bucket without the probe key: %v", err)
	}
	b, err := store.Bucket(live)
	if err != nil {
		t.Fatal(err)
	}
	for _, body := range [][]byte{nil, []byte("x")} {
		if _, err := b.Put(ctx, objstore.PutInput{Key: probe.DefaultKey, ContentType: "application/octet-stream"}, body); err != nil {
			t.Fatal(err)
		}
		if err := pr.Probe(ctx, "live"); err != nil {
			t.Fatalf("live bucket with a %d-byte probe key: %v", len(body), err)
		}
	}
	for _, id := range []string{"gone", "refused", "not-s3"} {
		if err := pr.Probe(ctx, id); err == nil || errors.Is(err, probe.ErrNotProbed) {
			t.Fatalf("probe of the %s bucket: %v, want a failure", id, err)
		}
	}
	if err := pr.Probe(ctx, "unknown"); !errors.Is(err, probe.ErrNotProbed) {
		t.Fatalf("probe of an unknown bucket: %v, want ErrNotProbed", err)
	}
}
