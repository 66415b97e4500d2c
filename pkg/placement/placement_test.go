package placement_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/placement"
)

// cands: a is least used but lowest priority; b is fastest; c is slowest.
func cands() []placement.Candidate {
	return []placement.Candidate{
		{ID: "a", Priority: 2, Weight: 3, LimitBytes: 100, UsedBytes: 10, LatencyEWMA: 30 * time.Millisecond},
		{ID: "b", Priority: 1, Weight: 2, LimitBytes: 100, UsedBytes: 60, ReservedBytes: 30, LatencyEWMA: 5 * time.Millisecond},
		{ID: "c", Priority: 1, Weight: 1, LimitBytes: 100, UsedBytes: 50, LatencyEWMA: 80 * time.Millisecond},
	}
}

func ids(cs []placement.Candidate) string {
	s := ""
	for _, c := range cs {
		s += c.ID
	}
	return s
}

func mustNew(t *testing.T, kind allocatorv1.Strategy, seed uint64) placement.Strategy {
	t.Helper()
	s, err := placement.New(kind, rand.New(rand.NewPCG(seed, seed+1)))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func allKinds() []allocatorv1.Strategy {
	var out []allocatorv1.Strategy
	for k := range allocatorv1.Strategy_name {
		out = append(out, allocatorv1.Strategy(k))
	}
	slices.Sort(out)
	return out
}

func TestDeterministicOrders(t *testing.T) {
	cases := []struct {
		name  string
		kind  allocatorv1.Strategy
		cands []placement.Candidate
		want  string
	}{
		// b is 90 % used counting its reservations, c 50 %.
		{"priority-first ties by usage incl. reserved", allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, cands(), "cba"},
		{"unspecified is priority-first", allocatorv1.Strategy_STRATEGY_UNSPECIFIED, cands(), "cba"},
		{"least-used counts reserved bytes", allocatorv1.Strategy_STRATEGY_LEAST_USED, cands(), "acb"},
		{"least-used ties by ID", allocatorv1.Strategy_STRATEGY_LEAST_USED, []placement.Candidate{
			{ID: "z", LimitBytes: 10, UsedBytes: 5}, {ID: "y", LimitBytes: 20, UsedBytes: 10}, {ID: "x", LimitBytes: 0}}, "yzx"},
		{"priority-first ties by usage then ID", allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, []placement.Candidate{
			{ID: "q", Priority: 5, LimitBytes: 10}, {ID: "p", Priority: 5, LimitBytes: 10}, {ID: "r", Priority: 4, LimitBytes: 10, UsedBytes: 9}}, "rpq"},
		{"affinity without a key falls back to least-used", allocatorv1.Strategy_STRATEGY_AFFINITY, cands(), "acb"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := mustNew(t, tc.kind, 1)
			if got := ids(s.Rank(placement.Request{}, tc.cands)); got != tc.want {
				t.Fatalf("order %q, want %q", got, tc.want)
			}
			if c, ok := placement.Pick(s, placement.Request{}, tc.cands); !ok || c.ID != tc.want[:1] {
				t.Fatalf("Pick = %q, %v; want %q", c.ID, ok, tc.want[:1])
			}
		})
	}
}

// Every strategy returns every candidate exactly once (the fallbacks are
// complete), leaves the input alone, and copes with zero and one candidate.
func TestRankIsAPermutation(t *testing.T) {
	for _, kind := range allKinds() {
		t.Run(kind.String(), func(t *testing.T) {
			s := mustNew(t, kind, 7)
			for i := 0; i < 50; i++ {
				in := cands()
				orig := slices.Clone(in)
				out := s.Rank(placement.Request{AffinityKey: fmt.Sprint("k", i)}, in)
				if !slices.Equal(in, orig) {
					t.Fatal("Rank modified its input")
				}
				got := slices.Sorted(slices.Values([]string{out[0].ID, out[1].ID, out[2].ID}))
				if len(out) != 3 || !slices.Equal(got, []string{"a", "b", "c"}) {
					t.Fatalf("Rank returned %q, want a permutation of abc", ids(out))
				}
			}
			if out := s.Rank(placement.Request{}, nil); len(out) != 0 {
				t.Fatalf("Rank(nil) = %v", out)
			}
			if _, ok := placement.Pick(s, placement.Request{}, nil); ok {
				t.Fatal("Pick found a candidate in an empty list")
			}
			one := []placement.Candidate{{ID: "only"}}
			if c, ok := placement.Pick(s, placement.Request{AffinityKey: "k"}, one); !ok || c.ID != "only" {
				t.Fatalf("Pick of one = %q, %v", c.ID, ok)
			}
		})
	}
}

// Distribution of first choices, table-driven. Each row gives the expected
// share per bucket and the allowed relative error.
func TestDistribution(t *testing.T) {
	type row struct {
		name     string
		picks    int
		pick     func(i int) string // returns the chosen ID of pick i
		want     map[string]float64
		relError float64
	}
	wrr3 := func() func(int) string {
		// Three replicas with their own balancer; requests land on random
		// replicas, as a client-side round robin over pods would.
		reps := []placement.Strategy{placement.NewWeightedRoundRobin(), placement.NewWeightedRoundRobin(), placement.NewWeightedRoundRobin()}
		rnd := rand.New(rand.NewPCG(1, 2))
		return func(int) string { return reps[rnd.IntN(3)].Rank(placement.Request{}, cands())[0].ID }
	}
	single := func(kind allocatorv1.Strategy, cs []placement.Candidate) func(int) string {
		s := mustNew(t, kind, 3)
		return func(i int) string { return s.Rank(placement.Request{AffinityKey: fmt.Sprint("user-", i)}, cs)[0].ID }
	}
	zeroWeights := []placement.Candidate{{ID: "a"}, {ID: "b", Weight: -1}, {ID: "c", Weight: 1}}
	four := []placement.Candidate{{ID: "a"}, {ID: "b"}, {ID: "c"}, {ID: "d"}}
	rows := []row{
		{"weighted round robin 3:2:1 over 3 replicas", 6000, wrr3(), map[string]float64{"a": 3. / 6, "b": 2. / 6, "c": 1. / 6}, 0.03},
		{"weighted round robin single replica is exact", 6000, single(allocatorv1.Strategy_STRATEGY_WEIGHTED_ROUND_ROBIN, cands()),
			map[string]float64{"a": 3. / 6, "b": 2. / 6, "c": 1. / 6}, 0},
		{"weighted round robin weight <= 0 counts as 1", 3000, single(allocatorv1.Strategy_STRATEGY_WEIGHTED_ROUND_ROBIN, zeroWeights),
			map[string]float64{"a": 1. / 3, "b": 1. / 3, "c": 1. / 3}, 0},
		// Power of two choices: the fastest wins every pair it is in (2/3),
		// the middle one wins only against the slowest (1/3), the slowest never.
		{"latency-aware power of two", 6000, single(allocatorv1.Strategy_STRATEGY_LATENCY_AWARE, cands()),
			map[string]float64{"b": 2. / 3, "a": 1. / 3, "c": 0}, 0.06},
		{"random is uniform", 6000, single(allocatorv1.Strategy_STRATEGY_RANDOM, cands()),
			map[string]float64{"a": 1. / 3, "b": 1. / 3, "c": 1. / 3}, 0.08},
		{"affinity spreads keys evenly", 8000, single(allocatorv1.Strategy_STRATEGY_AFFINITY, four),
			map[string]float64{"a": .25, "b": .25, "c": .25, "d": .25}, 0.1},
		{"priority-first always picks the top", 100, single(allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, cands()),
			map[string]float64{"c": 1, "a": 0, "b": 0}, 0},
	}
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			counts := map[string]int{}
			for i := 0; i < r.picks; i++ {
				counts[r.pick(i)]++
			}
			for id, want := range r.want {
				got := float64(counts[id]) / float64(r.picks)
				if math.Abs(got-want) > r.relError*want+1e-9 {
					t.Errorf("bucket %s got %.4f of %d picks, want %.4f ±%.0f%% (counts %v)", id, got, r.picks, want, 100*r.relError, counts)
				}
			}
		})
	}
}

// Smooth WRR interleaves instead of sending bursts: 3:2:1 gives a b a c b a.
func TestWeightedRoundRobinIsSmooth(t *testing.T) {
	s := placement.NewWeightedRoundRobin()
	got := ""
	for i := 0; i < 12; i++ {
		got += s.Rank(placement.Request{}, cands())[0].ID
	}
	if got != "abacbaabacba" {
		t.Fatalf("sequence %q, want abacbaabacba", got)
	}
}

// Three replicas used by 12 goroutines at once (run with -race): 6,000
// picks still land within ±3 % of the weights.
func TestWeightedRoundRobinConcurrent(t *testing.T) {
	reps := []*placement.WeightedRoundRobin{placement.NewWeightedRoundRobin(), placement.NewWeightedRoundRobin(), placement.NewWeightedRoundRobin()}
	var mu sync.Mutex
	counts := map[string]int{}
	var wg sync.WaitGroup
	for g := 0; g < 12; g++ {
		wg.Add(1)
		go func(r *placement.WeightedRoundRobin) {
			defer wg.Done()
			local := map[string]int{}
			for i := 0; i < 500; i++ {
				local[r.Rank(placement.Request{}, cands())[0].ID]++
			}
			mu.Lock()
			for k, v := range local {
				counts[k] += v
			}
			mu.Unlock()
		}(reps[g%3])
	}
	wg.Wait()
	for id, w := range map[string]float64{"a": 3, "b": 2, "c": 1} {
		want := w / 6
		if got := float64(counts[id]) / 6000; math.Abs(got-want) > 0.03*want {
			t.Errorf("bucket %s got %.4f, want %.4f ±3%% (%v)", id, got, want, counts)
		}
	}
}

// Rendezvous hashing: a key keeps its bucket; removing a bucket moves only
// its keys, and spreads them over the others; adding one moves keys only
// onto the new bucket.
func TestAffinityStableAndMinimalMovement(t *testing.T) {
	s := mustNew(t, allocatorv1.Strategy_STRATEGY_AFFINITY, 1)
	pick := func(k string, cs []placement.Candidate) string {
		return s.Rank(placement.Request{AffinityKey: k}, cs)[0].ID
	}
	all := []placement.Candidate{{ID: "a", LimitBytes: 10}, {ID: "b"}, {ID: "c", UsedBytes: 9}, {ID: "d"}}
	before := map[string]string{}
	for i := 0; i < 2000; i++ {
		k := fmt.Sprintf("user-%d", i)
		before[k] = pick(k, all)
		if again := pick(k, all); again != before[k] {
			t.Fatalf("key %s moved from %s to %s with no change", k, before[k], again)
		}
		// Usage and order of the input do not matter, only the set.
		rev := slices.Clone(all)
		slices.Reverse(rev)
		rev[0].UsedBytes = 7
		if again := pick(k, rev); again != before[k] {
			t.Fatalf("key %s moved from %s to %s when the input order changed", k, before[k], again)
		}
	}
	without := []placement.Candidate{{ID: "a"}, {ID: "b"}, {ID: "d"}} // c removed
	moved := map[string]int{}
	for k, was := range before {
		now := pick(k, without)
		if was != "c" && now != was {
			t.Fatalf("key %s moved %s -> %s though its bucket stayed", k, was, now)
		}
		if was == "c" {
			moved[now]++
		}
	}
	if len(moved) != 3 {
		t.Fatalf("keys of the removed bucket went to %v, want spread over a, b and d", moved)
	}
	with := append(slices.Clone(all), placement.Candidate{ID: "e"})
	gained := 0
	for k, was := range before {
		now := pick(k, with)
		if now != was && now != "e" {
			t.Fatalf("adding e moved key %s %s -> %s", k, was, now)
		}
		if now == "e" {
			gained++
		}
	}
	if gained < 300 || gained > 500 {
		t.Fatalf("new bucket e took %d of 2000 keys, want about 400", gained)
	}
}

func TestParse(t *testing.T) {
	cases := []struct {
		name string
		want allocatorv1.Strategy
	}{
		{"", allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST},
		{"priority-first", allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST},
		{"least-used", allocatorv1.Strategy_STRATEGY_LEAST_USED},
		{"weighted-round-robin", allocatorv1.Strategy_STRATEGY_WEIGHTED_ROUND_ROBIN},
		{"wrr", allocatorv1.Strategy_STRATEGY_WEIGHTED_ROUND_ROBIN},
		{"affinity", allocatorv1.Strategy_STRATEGY_AFFINITY},
		{"latency-aware", allocatorv1.Strategy_STRATEGY_LATENCY_AWARE},
		{"random", allocatorv1.Strategy_STRATEGY_RANDOM},
	}
	for _, tc := range cases {
		got, err := placement.Parse(tc.name)
		if err != nil || got != tc.want {
			t.Errorf("Parse(%q) = %v, %v; want %v", tc.name, got, err, tc.want)
		}
		if _, err := placement.New(got, nil); err != nil {
			t.Errorf("New(%v): %v", got, err)
		}
	}
	if _, err := placement.Parse("fastest"); err == nil {
		t.Error("Parse accepted an unknown strategy")
	}
	if _, err := placement.New(allocatorv1.Strategy(99), nil); err == nil {
		t.Error("New accepted an unknown strategy kind")
	}
}
