package health_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bucketlb/bucketlb/pkg/health"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// clock is the injected clock: tests move time by minutes without waiting.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// run starts s.Run until the test ends and waits for it to return.
func run(t *testing.T, s *health.Store) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// Two replicas on separate etcd clients: three failures on A cool the
// bucket down on B too; after the cooldown exactly one of 16 concurrent
// callers spread over both replicas gets the trial; a failed trial cools
// down longer; a good one restores full traffic everywhere.
func TestSharedCooldownAndSingleTrial(t *testing.T) {
	srv, cliA := testenv.Etcd(t)
	cliB := testenv.EtcdClient(t, srv.Endpoint)
	clk := newClock()
	a := health.NewStore(cliA, "", clk.Now, health.Policy{})
	b := health.NewStore(cliB, "", clk.Now, health.Policy{})
	run(t, a)
	run(t, b)
	ctx := testCtx(t)
	p := a.Policy()

	for i := 0; i < 2; i++ {
		if _, err := a.Report(ctx, "x", false, 10*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "B sees 2 failures", func() bool { r, _ := b.Cached("x"); return r.Failures == 2 })
	if ok, err := b.Admit(ctx, "x"); err != nil || !ok {
		t.Fatalf("2 failures must not stop traffic: %v, %v", ok, err)
	}
	r, err := a.Report(ctx, "x", false, 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if want := clk.Now().Add(15 * time.Minute); !r.CooldownUntil.Equal(want) {
		t.Fatalf("cooldown until %v, want %v (3 × 5 min)", r.CooldownUntil, want)
	}
	waitFor(t, "B sees the cooldown", func() bool { return b.Snapshot()["x"].CoolingDown(clk.Now(), p) })
	for _, s := range []*health.Store{a, b} {
		if ok, err := s.Admit(ctx, "x"); err != nil || ok {
			t.Fatalf("traffic admitted during cooldown: %v, %v", ok, err)
		}
	}
	clk.advance(15*time.Minute - time.Second)
	if ok, _ := b.Admit(ctx, "x"); ok {
		t.Fatal("admitted a second before the cooldown ends")
	}

	clk.advance(2 * time.Second)
	if got := concurrentAdmits(ctx, 16, a, b); got != 1 {
		t.Fatalf("%d trials admitted after cooldown, want exactly 1", got)
	}
	// The trial fails: 4 failures, 20 min.
	r, err = b.Report(ctx, "x", false, 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if want := clk.Now().Add(20 * time.Minute); r.Failures != 4 || !r.CooldownUntil.Equal(want) {
		t.Fatalf("after a failed trial: %d failures, cooldown until %v; want 4 and %v", r.Failures, r.CooldownUntil, want)
	}
	waitFor(t, "A sees the longer cooldown", func() bool { r, _ := a.Cached("x"); return r.Failures == 4 })
	if ok, _ := a.Admit(ctx, "x"); ok {
		t.Fatal("admitted right after a failed trial")
	}
	clk.advance(20 * time.Minute)
	if got := concurrentAdmits(ctx, 16, a, b); got != 1 {
		t.Fatalf("%d trials admitted after the second cooldown, want exactly 1", got)
	}
	if r, err = a.Report(ctx, "x", true, 10*time.Millisecond); err != nil || r.Failures != 0 || !r.CooldownUntil.IsZero() {
		t.Fatalf("after a good trial: %+v, %v", r, err)
	}
	waitFor(t, "B sees the recovery", func() bool { r, _ := b.Cached("x"); return r.Failures == 0 })
	if got := concurrentAdmits(ctx, 16, a, b); got != 16 {
		t.Fatalf("%d of 16 admitted after a good trial, want full traffic", got)
	}
}

func concurrentAdmits(ctx context.Context, n int, stores ...*health.Store) int {
	var admitted atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(s *health.Store) {
			defer wg.Done()
			<-start
			if ok, err := s.Admit(ctx, "x"); err == nil && ok {
				admitted.Add(1)
			}
		}(stores[i%len(stores)])
	}
	close(start)
	wg.Wait()
	return int(admitted.Load())
}

// The cooldown schedule: min(30 min, failures × 5 min) from the third
// consecutive failure, each further failure being a failed trial after
// the previous cooldown, through etcd.
func TestCooldownSchedule(t *testing.T) {
	_, cli := testenv.Etcd(t)
	clk := newClock()
	s := health.NewStore(cli, "", clk.Now, health.Policy{})
	ctx := testCtx(t)
	want := []time.Duration{0, 0, 15 * time.Minute, 20 * time.Minute, 25 * time.Minute, 30 * time.Minute, 30 * time.Minute, 30 * time.Minute}
	for i, w := range want {
		failures := i + 1
		t.Run(fmt.Sprintf("%d failures", failures), func(t *testing.T) {
			r, err := s.Report(ctx, "x", false, time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if r.Failures != failures || s.Policy().Cooldown(failures) != w {
				t.Fatalf("failures %d, policy cooldown %v; want %d, %v", r.Failures, s.Policy().Cooldown(failures), failures, w)
			}
			if w == 0 {
				if !r.CooldownUntil.IsZero() || r.CoolingDown(clk.Now(), s.Policy()) {
					t.Fatalf("cooling down after %d failures", failures)
				}
				return
			}
			if got := r.CooldownUntil.Sub(clk.Now()); got != w {
				t.Fatalf("cooldown %v, want %v", got, w)
			}
			clk.advance(w) // the cooldown ends; the next failure is the trial's
		})
	}
}

// Outcomes of requests still in flight when the cooldown began count in
// the score but neither end nor lengthen the cooldown.
func TestOutcomesDuringCooldownKeepIt(t *testing.T) {
	_, cli := testenv.Etcd(t)
	clk := newClock()
	s := health.NewStore(cli, "", clk.Now, health.Policy{})
	ctx := testCtx(t)
	var r health.Record
	var err error
	for i := 0; i < 3; i++ {
		if r, err = s.Report(ctx, "x", false, 0); err != nil {
			t.Fatal(err)
		}
	}
	until := r.CooldownUntil
	clk.advance(time.Minute)
	for i, ok := range []bool{false, false, true, false, true} {
		if r, err = s.Report(ctx, "x", ok, 0); err != nil {
			t.Fatal(err)
		}
		if r.Failures != 3 || !r.CooldownUntil.Equal(until) || len(r.Recent) != 4+i {
			t.Fatalf("outcome %d during cooldown changed it: failures %d, until %v (want 3, %v), window %d", i, r.Failures, r.CooldownUntil, until, len(r.Recent))
		}
	}
	if ok, _ := s.Admit(ctx, "x"); ok {
		t.Fatal("a success during cooldown ended it")
	}
	if r.Score() != 25 {
		t.Fatalf("score %d, want 25 (2 of 8 recent outcomes succeeded)", r.Score())
	}
}

// A claimed trial that is never reported (its caller died) expires after
// TrialTimeout; then exactly one new trial is admitted.
func TestAbandonedTrialExpires(t *testing.T) {
	_, cli := testenv.Etcd(t)
	clk := newClock()
	s := health.NewStore(cli, "", clk.Now, health.Policy{TrialTimeout: time.Minute})
	ctx := testCtx(t)
	for i := 0; i < 3; i++ {
		if _, err := s.Report(ctx, "x", false, 0); err != nil {
			t.Fatal(err)
		}
	}
	clk.advance(15 * time.Minute)
	if got := concurrentAdmits(ctx, 8, s); got != 1 {
		t.Fatalf("%d trials, want 1", got)
	}
	clk.advance(59 * time.Second)
	if got := concurrentAdmits(ctx, 8, s); got != 0 {
		t.Fatalf("%d trials while the first is still out, want 0", got)
	}
	clk.advance(time.Second)
	if got := concurrentAdmits(ctx, 8, s); got != 1 {
		t.Fatalf("%d trials after the first expired, want 1", got)
	}
}

// A probe reads: its success does not end a run of failures uploads took
// part in, nor may a probe take the trial after one, so a bucket that
// answers reads but refuses writes cools down after three failed uploads
// however many probes pass between them, and its cooldowns grow as its
// trial uploads fail. Probes alone still cool a bucket down, take its
// trial and end the run.
func TestProbesDoNotVouchForWrites(t *testing.T) {
	_, cli := testenv.Etcd(t)
	clk := newClock()
	s := health.NewStore(cli, "", clk.Now, health.Policy{})
	run(t, s)
	ctx := testCtx(t)
	report := func(probe, ok bool) health.Record {
		t.Helper()
		var r health.Record
		var err error
		if probe {
			r, err = s.ReportProbe(ctx, "w", ok, time.Millisecond)
		} else {
			r, err = s.Report(ctx, "w", ok, time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	for i := 0; i < 3; i++ {
		report(false, false) // an upload fails
		report(true, true)   // a probe passes
		report(true, true)
	}
	r := readRecord(t, cli, "w")
	if !r.CoolingDown(clk.Now(), s.Policy()) || r.Failures != 3 {
		t.Fatalf("after three failed uploads between passing probes: %+v, want cooling down after 3 failures", r)
	}
	for round, want := range []time.Duration{20 * time.Minute, 25 * time.Minute} {
		clk.advance(r.CooldownUntil.Sub(clk.Now())) // half-open
		if ok, err := s.AdmitProbe(ctx, "w"); err != nil || ok {
			t.Fatalf("round %d: a probe was admitted as the trial (%v, %v) after uploads failed", round, ok, err)
		}
		if ok, err := s.Admit(ctx, "w"); err != nil || !ok {
			t.Fatalf("round %d: no trial for an upload: %v, %v", round, ok, err)
		}
		r = report(false, false) // the trial upload fails
		if got := r.CooldownUntil.Sub(clk.Now()); got != want {
			t.Fatalf("round %d: cooldown %v after the trial failed, want %v", round, got, want)
		}
	}
	clk.advance(r.CooldownUntil.Sub(clk.Now()))
	if ok, err := s.Admit(ctx, "w"); err != nil || !ok {
		t.Fatalf("no trial for an upload: %v, %v", ok, err)
	}
	if r = report(false, true); !r.Healthy(s.Policy()) || r.Failures != 0 || r.WriteFailures != 0 {
		t.Fatalf("a successful trial upload left %+v, want healthy", r)
	}

	// Probes alone: they cool the bucket down, take its trial, end the run.
	for i := 0; i < 3; i++ {
		report(true, false)
	}
	r = readRecord(t, cli, "w")
	if !r.CoolingDown(clk.Now(), s.Policy()) {
		t.Fatalf("after three failed probes: %+v, want cooling down", r)
	}
	clk.advance(r.CooldownUntil.Sub(clk.Now()))
	if ok, err := s.AdmitProbe(ctx, "w"); err != nil || !ok {
		t.Fatalf("a probe was not admitted as the trial after probes alone failed: %v, %v", ok, err)
	}
	if r = report(true, true); !r.Healthy(s.Policy()) {
		t.Fatalf("a passing trial probe left %+v, want healthy", r)
	}
}

// An abandoned trial (the request was never sent) can be claimed again at
// once by another replica.
func TestAbandonedTrialIsReclaimed(t *testing.T) {
	srv, cliA := testenv.Etcd(t)
	clk := newClock()
	a := health.NewStore(cliA, "", clk.Now, health.Policy{})
	b := health.NewStore(testenv.EtcdClient(t, srv.Endpoint), "", clk.Now, health.Policy{})
	ctx := testCtx(t)
	for i := 0; i < 3; i++ {
		if _, err := a.Report(ctx, "x", false, 0); err != nil {
			t.Fatal(err)
		}
	}
	clk.advance(15 * time.Minute)
	if ok, err := a.Admit(ctx, "x"); err != nil || !ok {
		t.Fatalf("first trial: %v, %v", ok, err)
	}
	if ok, _ := b.Admit(ctx, "x"); ok {
		t.Fatal("second trial admitted while the first is out")
	}
	if err := a.AbandonTrial(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if got := concurrentAdmits(ctx, 8, a, b); got != 1 {
		t.Fatalf("%d trials after the first was abandoned, want 1", got)
	}
	r := readRecord(t, cliA, "x")
	if r.Failures != 3 || !r.HalfOpen(clk.Now(), a.Policy()) {
		t.Fatalf("abandoning changed the record: %+v", r)
	}
}

// 64 concurrent failure reports from two replicas (a dying hot bucket)
// are all recorded, none fails, and the cooldown is the one for 3 failures: reports of one replica are written
// together, and compare-and-put conflicts between replicas are retried.
func TestConcurrentReportsAllCount(t *testing.T) {
	srv, cliA := testenv.Etcd(t)
	cliB := testenv.EtcdClient(t, srv.Endpoint)
	clk := newClock()
	pol := health.Policy{Window: 100}
	a := health.NewStore(cliA, "", clk.Now, pol)
	b := health.NewStore(cliB, "", clk.Now, pol)
	run(t, b) // one with a cache (possibly stale starting values), one without
	ctx := testCtx(t)
	rev0 := revision(t, cliA)
	const n = 64
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(s *health.Store) {
			defer wg.Done()
			<-start
			if _, err := s.Report(ctx, "x", false, time.Millisecond); err != nil {
				errs <- err
			}
		}([]*health.Store{a, b}[i%2])
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	r := readRecord(t, cliA, "x")
	// Every outcome is in the window (a lost update would drop one); the
	// first three started the cooldown, the rest happened during it.
	if r.Failures != 3 || len(r.Recent) != n || !r.CoolingDown(clk.Now(), a.Policy()) {
		t.Fatalf("after %d concurrent failures: failures %d, window %d, cooling %v", n, r.Failures, len(r.Recent), r.CoolingDown(clk.Now(), a.Policy()))
	}
	if want := clk.Now().Add(15 * time.Minute); !r.CooldownUntil.Equal(want) {
		t.Fatalf("cooldown until %v, want %v: concurrency must not lengthen it", r.CooldownUntil, want)
	}
	t.Logf("%d concurrent failure reports took %d etcd writes", n, revision(t, cliA)-rev0)
}

// While Run is running, successes on a healthy bucket are batched: 200
// reports from 8 goroutines cost far fewer than 200 writes, none is lost,
// and the other replica sees them. A failure is written at once, after
// the buffered successes.
func TestSuccessesAreBatched(t *testing.T) {
	srv, cliA := testenv.Etcd(t)
	cliB := testenv.EtcdClient(t, srv.Endpoint)
	clk := newClock()
	pol := health.Policy{Window: 1000, FlushEvery: 20 * time.Millisecond}
	a := health.NewStore(cliA, "", clk.Now, pol)
	b := health.NewStore(cliB, "", clk.Now, pol)
	run(t, a)
	run(t, b)
	ctx := testCtx(t)
	// Wait until A's cache is synced (it sees B's write): from then on, a
	// success on a healthy bucket is buffered.
	if _, err := b.Report(ctx, "other", false, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "A's cache is synced", func() bool { _, ok := a.Cached("other"); return ok })
	start := revision(t, cliA)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 25; i++ {
				if r, err := a.Report(ctx, "x", true, 100*time.Millisecond); err != nil || r.Failures != 0 {
					t.Errorf("Report: %+v, %v", r, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	waitFor(t, "B sees all 200 successes", func() bool { return len(b.Snapshot()["x"].Recent) == 200 })
	writes := revision(t, cliA) - start
	t.Logf("200 successes took %d etcd writes", writes)
	if writes > 40 {
		t.Fatalf("200 successes took %d etcd writes; batching is not working", writes)
	}
	r, err := a.Report(ctx, "x", false, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	stored := readRecord(t, cliA, "x")
	if stored.Failures != 1 || len(stored.Recent) != 201 || stored.Recent[200] || r.Failures != 1 {
		t.Fatalf("failure not written at once after the successes: stored %d failures, window %d", stored.Failures, len(stored.Recent))
	}
	if got := stored.Latency(); got != 100*time.Millisecond {
		t.Fatalf("latency EWMA %v, want 100ms", got)
	}
	// With a failure on record, a success is written at once and clears it.
	if _, err := a.Report(ctx, "x", true, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if stored := readRecord(t, cliA, "x"); stored.Failures != 0 || len(stored.Recent) != 202 {
		t.Fatalf("success after a failure not written at once: %d failures, window %d", stored.Failures, len(stored.Recent))
	}
}

// The window slides by the right amount whether outcomes are written at
// once, buffered one by one, or folded in as a whole batch when a failure
// is written after them.
func TestWindowSlidesAcrossBatches(t *testing.T) {
	_, cli := testenv.Etcd(t)
	clk := newClock()
	s := health.NewStore(cli, "", clk.Now, health.Policy{Window: 4, FlushEvery: time.Hour})
	run(t, s)
	ctx := testCtx(t)
	for _, ok := range []bool{false, true} { // with a failure on record, both are written at once
		if _, err := s.Report(ctx, "x", ok, 10*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the cache holds the two outcomes", func() bool { r, ok := s.Cached("x"); return ok && len(r.Recent) == 2 })
	want := [][]bool{{false, true, true}, {false, true, true, true}, {true, true, true, true}, {true, true, true, true}}
	var last health.Record
	for i, w := range want {
		r, err := s.Report(ctx, "x", true, 10*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(r.Recent) != fmt.Sprint(w) {
			t.Fatalf("buffered success %d: window %v, want %v", i+1, r.Recent, w)
		}
		last = r
	}
	if stored := readRecord(t, cli, "x"); len(stored.Recent) != 2 {
		t.Fatalf("the successes were written at once (window %v); they should be buffered", stored.Recent)
	}
	if _, err := s.Report(ctx, "x", false, 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	stored := readRecord(t, cli, "x")
	if fmt.Sprint(stored.Recent) != fmt.Sprint([]bool{true, true, true, false}) || stored.Failures != 1 {
		t.Fatalf("after the batch and a failure: window %v, failures %d; want [true true true false], 1", stored.Recent, stored.Failures)
	}
	if last.Latency() != 10*time.Millisecond || stored.Latency() != 10*time.Millisecond {
		t.Fatalf("latency EWMA %v buffered, %v stored; want 10ms", last.Latency(), stored.Latency())
	}
}

// Without Run nothing would flush a batch, so every report is written.
func TestWithoutRunReportsAreWritten(t *testing.T) {
	_, cli := testenv.Etcd(t)
	s := health.NewStore(cli, "", nil, health.Policy{})
	ctx := testCtx(t)
	for i := 0; i < 5; i++ {
		if _, err := s.Report(ctx, "x", true, time.Duration(i)*100*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	r := readRecord(t, cli, "x")
	// EWMA over 0,100,200,300,400 ms with α = 0.2, the first sample taken as is
	// (0 counts as "no sample yet", so 100 ms starts it).
	if len(r.Recent) != 5 || r.Score() != 100 {
		t.Fatalf("window %d score %d, want 5 and 100", len(r.Recent), r.Score())
	}
	if want := 0.8*(0.8*100+0.2*200)*0.8 + 0.8*0.2*300 + 0.2*400; abs(r.LatencyMS-want) > 1e-6 {
		t.Fatalf("latency EWMA %.3f ms, want %.3f", r.LatencyMS, want)
	}
}

func abs(f float64) float64 {
	if f < 0 {
		return -f
	}
	return f
}

// Healthy and cooling buckets are answered from the watch-fed cache:
// Admit keeps answering with etcd stopped.
func TestAdmitAnswersFromCache(t *testing.T) {
	srv, direct := testenv.Etcd(t)
	proxy := newCutter(t, srv.Endpoint)
	cli := testenv.EtcdClient(t, proxy.endpoint())
	clk := newClock()
	s := health.NewStore(cli, "", clk.Now, health.Policy{})
	w := health.NewStore(direct, "", clk.Now, health.Policy{}) // writes, so s learns only through Run
	ctx := testCtx(t)
	for i := 0; i < 3; i++ {
		if _, err := w.Report(ctx, "sick", false, 0); err != nil {
			t.Fatal(err)
		}
	}
	run(t, s)
	waitFor(t, "the cache is loaded", func() bool { _, ok := s.Cached("sick"); return ok })
	proxy.cut()
	gctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	if _, err := cli.Get(gctx, "/"); err == nil {
		t.Fatal("etcd still reachable through the cut proxy")
	}
	cancel()
	for _, tc := range []struct {
		bucket string
		want   bool
	}{{"fresh", true}, {"sick", false}} {
		actx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		ok, err := s.Admit(actx, tc.bucket)
		cancel()
		if err != nil || ok != tc.want {
			t.Fatalf("Admit(%s) with etcd unreachable = %v, %v; want %v from the cache", tc.bucket, ok, err, tc.want)
		}
	}
	// A half-open bucket needs etcd to claim its trial: fail, don't guess.
	clk.advance(time.Hour)
	actx, acancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer acancel()
	if ok, err := s.Admit(actx, "sick"); err == nil || ok {
		t.Fatalf("Admit of a half-open bucket with etcd unreachable = %v, %v; want an error", ok, err)
	}
}

// Reset clears a bucket on every replica.
func TestResetClearsEverywhere(t *testing.T) {
	srv, cliA := testenv.Etcd(t)
	cliB := testenv.EtcdClient(t, srv.Endpoint)
	clk := newClock()
	a := health.NewStore(cliA, "/t/", clk.Now, health.Policy{})
	b := health.NewStore(cliB, "/t/", clk.Now, health.Policy{})
	run(t, b)
	ctx := testCtx(t)
	for i := 0; i < 5; i++ {
		if _, err := a.Report(ctx, "x", false, 0); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "B sees the cooldown", func() bool { r, _ := b.Cached("x"); return r.CoolingDown(clk.Now(), b.Policy()) })
	if err := a.Reset(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B sees the reset", func() bool { _, ok := b.Snapshot()["x"]; return !ok })
	for _, s := range []*health.Store{a, b} {
		if ok, err := s.Admit(ctx, "x"); err != nil || !ok {
			t.Fatalf("Admit after reset = %v, %v", ok, err)
		}
	}
	if r, _ := b.Cached("x"); r.Score() != 100 {
		t.Fatalf("score after reset %d", r.Score())
	}
}

func TestScore(t *testing.T) {
	cases := []struct {
		name   string
		recent []bool
		ms     float64
		want   int
	}{
		{"fresh", nil, 0, 100},
		{"all good fast", []bool{true, true, true, true}, 20, 100},
		{"half failing", []bool{true, false, true, false}, 20, 50},
		{"all good, 1.1 s", []bool{true, true}, 1100, 85},
		{"all good but slow", []bool{true, true}, 2000, 70},
		{"all good, slower still", []bool{true, true}, 9000, 70},
		{"dead", []bool{false, false}, 5000, 0},
	}
	for _, tc := range cases {
		if got := (health.Record{Recent: tc.recent, LatencyMS: tc.ms}).Score(); got != tc.want {
			t.Errorf("%s: score %d, want %d", tc.name, got, tc.want)
		}
	}
}

func revision(t *testing.T, cli *clientv3.Client) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/nothing")
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// readRecord reads a record from etcd with a store that has no cache.
func readRecord(t *testing.T, cli *clientv3.Client, bucket string) health.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/bucketlb/health/"+bucket)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("read %s: %v (%d keys)", bucket, err, len(resp.Kvs))
	}
	var r health.Record
	if err := jsonUnmarshal(resp.Kvs[0].Value, &r); err != nil {
		t.Fatal(err)
	}
	return r
}
