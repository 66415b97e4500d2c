// Package placement holds the strategies that choose a bucket among the
// eligible ones. Eligibility (ACTIVE, not cooling down, room for the size)
// is decided by the caller; a strategy only orders candidates.
package placement

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
)

// Candidate is an eligible bucket.
type Candidate struct {
	ID                    string
	Priority, Weight      int32
	LimitBytes, UsedBytes int64 // used includes reserved
	LatencyEWMA           time.Duration
}

func (c Candidate) utilization() float64 {
	if c.LimitBytes <= 0 {
		return math.Inf(1)
	}
	return float64(c.UsedBytes) / float64(c.LimitBytes)
}

// Request carries what a strategy may look at.
type Request struct {
	Size        int64
	AffinityKey string
}

// Strategy orders candidates: the first is the choice, the rest are
// fallbacks in order (used when a reservation on the first fails).
type Strategy interface {
	Rank(req Request, cands []Candidate) []Candidate
}

// New returns the strategy for kind. rnd may be nil (a random source).
func New(kind allocatorv1.Strategy, rnd *rand.Rand) (Strategy, error) {
	if rnd == nil {
		rnd = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	lr := &lockedRand{r: rnd}
	switch kind {
	case allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, allocatorv1.Strategy_STRATEGY_UNSPECIFIED:
		return PriorityFirst{}, nil
	case allocatorv1.Strategy_STRATEGY_LEAST_USED:
		return LeastUsed{}, nil
	case allocatorv1.Strategy_STRATEGY_WEIGHTED_ROUND_ROBIN:
		return NewWeightedRoundRobin(), nil
	case allocatorv1.Strategy_STRATEGY_AFFINITY:
		return Affinity{Fallback: LeastUsed{}}, nil
	case allocatorv1.Strategy_STRATEGY_LATENCY_AWARE:
		return &LatencyAware{rnd: lr}, nil
	case allocatorv1.Strategy_STRATEGY_RANDOM:
		return &Random{rnd: lr}, nil
	}
	return nil, fmt.Errorf("placement: unknown strategy %v", kind)
}

// Parse maps a config name like "priority-first" to a strategy kind.
func Parse(name string) (allocatorv1.Strategy, error) {
	switch name {
	case "", "priority-first":
		return allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, nil
	case "least-used":
		return allocatorv1.Strategy_STRATEGY_LEAST_USED, nil
	case "weighted-round-robin", "wrr":
		return allocatorv1.Strategy_STRATEGY_WEIGHTED_ROUND_ROBIN, nil
	case "affinity":
		return allocatorv1.Strategy_STRATEGY_AFFINITY, nil
	case "latency-aware":
		return allocatorv1.Strategy_STRATEGY_LATENCY_AWARE, nil
	case "random":
		return allocatorv1.Strategy_STRATEGY_RANDOM, nil
	}
	return 0, fmt.Errorf("placement: %q is not one of priority-first, least-used, weighted-round-robin, affinity, latency-aware, random", name)
}

type lockedRand struct {
	mu sync.Mutex
	r  *rand.Rand
}

func (l *lockedRand) perm(n int) []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.r.Perm(n)
}

// PriorityFirst prefers the lowest priority number, then the least used.
type PriorityFirst struct{}

// Rank implements Strategy.
func (PriorityFirst) Rank(_ Request, cands []Candidate) []Candidate {
	out := slices.Clone(cands)
	slices.SortStableFunc(out, func(a, b Candidate) int {
		if c := cmp.Compare(a.Priority, b.Priority); c != 0 {
			return c
		}
		if c := cmp.Compare(a.utilization(), b.utilization()); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	return out
}

// LeastUsed prefers the lowest (used+reserved)/limit.
type LeastUsed struct{}

// Rank implements Strategy.
func (LeastUsed) Rank(_ Request, cands []Candidate) []Candidate {
	out := slices.Clone(cands)
	slices.SortStableFunc(out, func(a, b Candidate) int {
		if c := cmp.Compare(a.utilization(), b.utilization()); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	return out
}

// WeightedRoundRobin is nginx's smooth weighted round robin. Each replica
// runs its own; since each one's sequence follows the weights exactly over
// every cycle, the union across replicas does too, within one cycle per
// replica.
type WeightedRoundRobin struct {
	mu      sync.Mutex
	current map[string]int64
}

// NewWeightedRoundRobin returns an empty balancer.
func NewWeightedRoundRobin() *WeightedRoundRobin {
	return &WeightedRoundRobin{current: map[string]int64{}}
}

// Rank implements Strategy.
func (w *WeightedRoundRobin) Rank(_ Request, cands []Candidate) []Candidate {
	if len(cands) == 0 {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	var total int64
	best := -1
	for i, c := range cands {
		wt := int64(max(c.Weight, 1))
		total += wt
		w.current[c.ID] += wt
		if best < 0 || w.current[c.ID] > w.current[cands[best].ID] {
			best = i
		}
	}
	w.current[cands[best].ID] -= total
	out := make([]Candidate, 0, len(cands))
	out = append(out, cands[best])
	rest := slices.Clone(cands)
	rest = slices.Delete(rest, best, best+1)
	slices.SortStableFunc(rest, func(a, b Candidate) int { return cmp.Compare(w.current[b.ID], w.current[a.ID]) })
	return append(out, rest...)
}

// Affinity ranks by rendezvous (highest random weight) hashing of the
// affinity key: a key keeps its bucket while that bucket is eligible, and
// removing a bucket moves only the keys that were on it. Requests without
// a key use Fallback.
type Affinity struct{ Fallback Strategy }

// Rank implements Strategy.
func (a Affinity) Rank(req Request, cands []Candidate) []Candidate {
	if req.AffinityKey == "" {
		return a.Fallback.Rank(req, cands)
	}
	type scored struct {
		c Candidate
		s uint64
	}
	sc := make([]scored, len(cands))
	for i, c := range cands {
		h := fnv.New64a()
		h.Write([]byte(c.ID))
		h.Write([]byte{0})
		h.Write([]byte(req.AffinityKey))
		sc[i] = scored{c, mix(h.Sum64())}
	}
	slices.SortFunc(sc, func(x, y scored) int { return cmp.Compare(y.s, x.s) })
	out := make([]Candidate, len(sc))
	for i, s := range sc {
		out[i] = s.c
	}
	return out
}

// mix is splitmix64's finalizer: FNV's low bits are weak for short keys.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// LatencyAware picks two candidates at random and prefers the one with
// the lower EWMA latency (power of two choices): it follows fast buckets
// without stampeding onto the single fastest one.
type LatencyAware struct{ rnd *lockedRand }

// Rank implements Strategy.
func (l *LatencyAware) Rank(_ Request, cands []Candidate) []Candidate {
	if len(cands) < 2 {
		return slices.Clone(cands)
	}
	p := l.rnd.perm(len(cands))
	out := make([]Candidate, 0, len(cands))
	a, b := cands[p[0]], cands[p[1]]
	if b.LatencyEWMA < a.LatencyEWMA {
		a, b = b, a
	}
	out = append(out, a, b)
	for _, i := range p[2:] {
		out = append(out, cands[i])
	}
	return out
}

// Random picks uniformly.
type Random struct{ rnd *lockedRand }

// Rank implements Strategy.
func (r *Random) Rank(_ Request, cands []Candidate) []Candidate {
	p := r.rnd.perm(len(cands))
	out := make([]Candidate, len(cands))
	for i, j := range p {
		out[i] = cands[j]
	}
	return out
}
