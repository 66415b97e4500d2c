package placement_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/placement"
)

func cands() []placement.Candidate {
	return []placement.Candidate{
		{ID: "a", Priority: 2, Weight: 3, LimitBytes: 100, UsedBytes: 10, LatencyEWMA: 30 * time.Millisecond},
		{ID: "b", Priority: 1, Weight: 2, LimitBytes: 100, UsedBytes: 90, LatencyEWMA: 5 * time.Millisecond},
		{ID: "c", Priority: 1, Weight: 1, LimitBytes: 100, UsedBytes: 50, LatencyEWMA: 80 * time.Millisecond},
	}
}

func TestDeterministicOrders(t *testing.T) {
	cases := []struct {
		kind allocatorv1.Strategy
		want string
	}{
		{allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, "cba"}, // priority 1 first, ties by least used
		{allocatorv1.Strategy_STRATEGY_UNSPECIFIED, "cba"},
		{allocatorv1.Strategy_STRATEGY_LEAST_USED, "acb"},
	}
	for _, tc := range cases {
		t.Run(tc.kind.String(), func(t *testing.T) {
			s, err := placement.New(tc.kind, nil)
			if err != nil {
				t.Fatal(err)
			}
			got := ""
			for _, c := range s.Rank(placement.Request{}, cands()) {
				got += c.ID
			}
			if got != tc.want {
				t.Fatalf("order %q, want %q", got, tc.want)
			}
		})
	}
}

// Three replicas, each with its own balancer, 6,000 picks in total land
// within ±3 % of the 3:2:1 weights.
func TestWeightedRoundRobinAcrossReplicas(t *testing.T) {
	replicas := []placement.Strategy{placement.NewWeightedRoundRobin(), placement.NewWeightedRoundRobin(), placement.NewWeightedRoundRobin()}
	counts := map[string]int{}
	rnd := rand.New(rand.NewPCG(1, 2))
	const n = 6000
	for i := 0; i < n; i++ {
		r := replicas[rnd.IntN(len(replicas))] // requests land on random replicas
		counts[r.Rank(placement.Request{}, cands())[0].ID]++
	}
	for id, w := range map[string]float64{"a": 3, "b": 2, "c": 1} {
		want := w / 6
		got := float64(counts[id]) / n
		if math.Abs(got-want) > 0.03*want {
			t.Errorf("bucket %s got %.4f of picks, want %.4f ±3%%", id, got, want)
		}
	}
}

func TestAffinityStableAndMinimalMovement(t *testing.T) {
	s, _ := placement.New(allocatorv1.Strategy_STRATEGY_AFFINITY, nil)
	all := []placement.Candidate{{ID: "a"}, {ID: "b"}, {ID: "c"}, {ID: "d"}}
	before := map[string]string{}
	perBucket := map[string]int{}
	for i := 0; i < 2000; i++ {
		k := fmt.Sprintf("user-%d", i)
		before[k] = s.Rank(placement.Request{AffinityKey: k}, all)[0].ID
		if again := s.Rank(placement.Request{AffinityKey: k}, all)[0].ID; again != before[k] {
			t.Fatalf("key %s moved from %s to %s with no change", k, before[k], again)
		}
		perBucket[before[k]]++
	}
	for id, n := range perBucket {
		if n < 350 || n > 650 {
			t.Errorf("bucket %s got %d of 2000 keys; hashing is badly skewed", id, n)
		}
	}
	without := []placement.Candidate{{ID: "a"}, {ID: "b"}, {ID: "d"}} // c removed
	for k, was := range before {
		now := s.Rank(placement.Request{AffinityKey: k}, without)[0].ID
		if was != "c" && now != was {
			t.Fatalf("key %s moved %s -> %s though its bucket stayed", k, was, now)
		}
	}
}

func TestLatencyAwarePrefersFaster(t *testing.T) {
	s, _ := placement.New(allocatorv1.Strategy_STRATEGY_LATENCY_AWARE, rand.New(rand.NewPCG(3, 4)))
	counts := map[string]int{}
	for i := 0; i < 3000; i++ {
		counts[s.Rank(placement.Request{}, cands())[0].ID]++
	}
	// Power of two choices: the fastest wins every pair it is in (2/3),
	// the slowest never wins.
	if counts["c"] != 0 || counts["b"] < 1800 || counts["a"] < 800 {
		t.Fatalf("latency-aware picks %v; want b≈2/3, a≈1/3, c=0", counts)
	}
}

func TestRandomCoversAll(t *testing.T) {
	s, _ := placement.New(allocatorv1.Strategy_STRATEGY_RANDOM, rand.New(rand.NewPCG(5, 6)))
	counts := map[string]int{}
	for i := 0; i < 3000; i++ {
		counts[s.Rank(placement.Request{}, cands())[0].ID]++
	}
	for _, id := range []string{"a", "b", "c"} {
		if counts[id] < 850 || counts[id] > 1150 {
			t.Fatalf("random picks %v, want about 1000 each", counts)
		}
	}
}

func TestParse(t *testing.T) {
	for _, n := range []string{"priority-first", "least-used", "weighted-round-robin", "affinity", "latency-aware", "random"} {
		if _, err := placement.Parse(n); err != nil {
			t.Errorf("Parse(%q): %v", n, err)
		}
	}
	if _, err := placement.Parse("fastest"); err == nil {
		t.Error("Parse accepted an unknown strategy")
	}
}
