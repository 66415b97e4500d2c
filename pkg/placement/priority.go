package placement

import (
	"cmp"
	"slices"
)

// PriorityFirst prefers the lowest priority number, then the least used,
// then the lowest ID (so the order is total and stable).
type PriorityFirst struct{}

// Rank implements Strategy.
func (PriorityFirst) Rank(_ Request, cands []Candidate) []Candidate {
	out := slices.Clone(cands)
	slices.SortStableFunc(out, func(a, b Candidate) int {
		if c := cmp.Compare(a.Priority, b.Priority); c != 0 {
			return c
		}
		return byUsage(a, b)
	})
	return out
}

// LeastUsed prefers the lowest (used+reserved)/limit, then the lowest ID.
type LeastUsed struct{}

// Rank implements Strategy.
func (LeastUsed) Rank(_ Request, cands []Candidate) []Candidate {
	out := slices.Clone(cands)
	slices.SortStableFunc(out, byUsage)
	return out
}

func byUsage(a, b Candidate) int {
	if c := cmp.Compare(a.Utilization(), b.Utilization()); c != 0 {
		return c
	}
	return cmp.Compare(a.ID, b.ID)
}
