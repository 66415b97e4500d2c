package placement

import (
	"cmp"
	"slices"
	"sync"
)

// WeightedRoundRobin is nginx's smooth weighted round robin: on each pick
// every candidate's current value grows by its weight, the largest wins
// and gives back the total. With weights 3:2:1 the sequence is
// a b a c b a, repeating: exact over every cycle of sum(weights) picks and
// never bursty.
//
// Each allocator replica runs its own balancer. Since each one's sequence
// follows the weights exactly over every cycle, the union across replicas
// does too, within one cycle per replica; no state is shared through etcd.
// A candidate that is not eligible for a while keeps its current value and
// resumes where it left.
type WeightedRoundRobin struct {
	mu      sync.Mutex
	current map[string]int64
}

// NewWeightedRoundRobin returns an empty balancer.
func NewWeightedRoundRobin() *WeightedRoundRobin {
	return &WeightedRoundRobin{current: map[string]int64{}}
}

// Rank implements Strategy. The fallbacks follow in order of their current
// value, i.e. the order in which they would be picked next.
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
	rest := slices.Delete(slices.Clone(cands), best, best+1)
	slices.SortStableFunc(rest, func(a, b Candidate) int { return cmp.Compare(w.current[b.ID], w.current[a.ID]) })
	return append(out, rest...)
}
