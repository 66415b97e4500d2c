package placement

import "slices"

// LatencyAware picks two candidates at random and prefers the one with
// the lower EWMA latency (power of two choices): it follows fast buckets
// without stampeding onto the single fastest one, which every replica
// would otherwise pick at once. The slowest candidate is never first.
// The fallbacks are the loser of the pair, then the rest at random.
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
