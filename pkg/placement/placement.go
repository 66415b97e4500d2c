package placement

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"time"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
)

// Candidate is an eligible bucket and what strategies may look at.
type Candidate struct {
	ID               string
	Priority, Weight int32 // lower Priority wins; Weight ≤ 0 counts as 1
	LimitBytes       int64 // monthly limit; ≤ 0 sorts last by usage
	// UsedBytes are committed bytes and ReservedBytes live reservations; a
	// caller that only knows their sum may put it all in UsedBytes.
	UsedBytes, ReservedBytes int64
	// LatencyEWMA is the bucket's recent latency; zero means not measured
	// yet, which latency-aware placement treats as fastest so a new bucket
	// gets measured.
	LatencyEWMA time.Duration
}

// Utilization is (used+reserved)/limit, +Inf without a limit.
func (c Candidate) Utilization() float64 {
	if c.LimitBytes <= 0 {
		return math.Inf(1)
	}
	return float64(c.UsedBytes+c.ReservedBytes) / float64(c.LimitBytes)
}

// Request carries what a strategy may look at.
type Request struct {
	Size        int64
	AffinityKey string
}

// Strategy orders candidates: the first is the choice, the rest are
// fallbacks in order. Rank returns a new slice holding every candidate
// once and never modifies cands. Implementations are safe for concurrent
// use.
type Strategy interface {
	Rank(req Request, cands []Candidate) []Candidate
}

// Pick returns s's first choice, or false when there is no candidate.
func Pick(s Strategy, req Request, cands []Candidate) (Candidate, bool) {
	if len(cands) == 0 {
		return Candidate{}, false
	}
	return s.Rank(req, cands)[0], true
}

// New returns the strategy for kind; UNSPECIFIED means priority-first.
// rnd drives the random strategies and may be nil (a randomly seeded
// source); it is only used under a lock, so one source may be shared.
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

// Parse maps a configuration name like "priority-first" to a strategy
// kind. The empty name means priority-first; "wrr" is accepted for
// weighted-round-robin.
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
	return 0, fmt.Errorf("placement: strategy %q is not one of priority-first, least-used, weighted-round-robin, affinity, latency-aware, random", name)
}

// lockedRand shares one *rand.Rand (not safe for concurrent use) between
// goroutines.
type lockedRand struct {
	mu sync.Mutex
	r  *rand.Rand
}

func (l *lockedRand) perm(n int) []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.r.Perm(n)
}
