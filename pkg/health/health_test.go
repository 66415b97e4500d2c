package health_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/health"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

type clock struct{ ns atomic.Int64 }

func (c *clock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }

func TestSharedCooldownAndSingleTrial(t *testing.T) {
	srv, cliA := testenv.Etcd(t)
	cliB := testenv.EtcdClient(t, srv.Endpoint)
	clk := &clock{}
	clk.ns.Store(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).UnixNano())
	a := health.NewStore(cliA, "", clk.now, health.Policy{})
	b := health.NewStore(cliB, "", clk.now, health.Policy{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go b.Run(ctx)
	p := a.Policy()

	for i := 0; i < 2; i++ {
		if _, err := a.Report(ctx, "x", false, 10*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	if ok, _ := a.Admit(ctx, "x"); !ok {
		t.Fatal("2 failures must not stop traffic")
	}
	r, err := a.Report(ctx, "x", false, 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if want := clk.now().Add(15 * time.Minute); !r.CooldownUntil.Equal(want) {
		t.Fatalf("cooldown until %v, want %v (3 × 5 min)", r.CooldownUntil, want)
	}
	// Replica B sees the cooldown through its watch.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if rb, ok := b.Cached("x"); ok && rb.CoolingDown(clk.now(), p) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("replica B never saw the cooldown")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if ok, _ := b.Admit(ctx, "x"); ok {
		t.Fatal("replica B admitted traffic during cooldown")
	}

	// After the cooldown exactly one of many concurrent callers on both
	// replicas gets the trial.
	clk.advance(15*time.Minute + time.Second)
	var admitted atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(s *health.Store) {
			defer wg.Done()
			if ok, err := s.Admit(ctx, "x"); err == nil && ok {
				admitted.Add(1)
			}
		}([]*health.Store{a, b}[i%2])
	}
	wg.Wait()
	if admitted.Load() != 1 {
		t.Fatalf("%d trials admitted after cooldown, want exactly 1", admitted.Load())
	}
	// The trial fails: a longer cooldown (4 × 5 min).
	r, _ = a.Report(ctx, "x", false, 10*time.Millisecond)
	if want := clk.now().Add(20 * time.Minute); !r.CooldownUntil.Equal(want) {
		t.Fatalf("cooldown after failed trial until %v, want %v", r.CooldownUntil, want)
	}
	// Cooldown is capped at 30 min.
	for i := 0; i < 5; i++ {
		r, _ = a.Report(ctx, "x", false, 0)
	}
	if want := clk.now().Add(30 * time.Minute); !r.CooldownUntil.Equal(want) {
		t.Fatalf("cooldown until %v, want cap %v", r.CooldownUntil, want)
	}
	clk.advance(31 * time.Minute)
	if ok, _ := b.Admit(ctx, "x"); !ok {
		t.Fatal("trial not admitted after the capped cooldown")
	}
	r, _ = b.Report(ctx, "x", true, 10*time.Millisecond)
	if r.Failures != 0 {
		t.Fatalf("failures after a good trial = %d", r.Failures)
	}
	for i := 0; i < 4; i++ {
		if ok, _ := a.Admit(ctx, "x"); !ok {
			t.Fatal("full traffic did not return after a successful trial")
		}
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
		{"all good but slow", []bool{true, true}, 2000, 70},
		{"dead", []bool{false, false}, 5000, 0},
	}
	for _, tc := range cases {
		if got := (health.Record{Recent: tc.recent, LatencyMS: tc.ms}).Score(); got != tc.want {
			t.Errorf("%s: score %d, want %d", tc.name, got, tc.want)
		}
	}
}
