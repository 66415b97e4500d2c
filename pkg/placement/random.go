package placement

// Random orders candidates uniformly at random.
type Random struct{ rnd *lockedRand }

// Rank implements Strategy.
func (r *Random) Rank(_ Request, cands []Candidate) []Candidate {
	if len(cands) == 0 {
		return nil
	}
	p := r.rnd.perm(len(cands))
	out := make([]Candidate, len(cands))
	for i, j := range p {
		out[i] = cands[j]
	}
	return out
}
