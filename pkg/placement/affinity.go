package placement

import (
	"cmp"
	"hash/fnv"
	"slices"
)

// Affinity ranks by rendezvous (highest random weight) hashing of the
// affinity key: every candidate gets a score hash(ID, key) and the highest
// wins. A key therefore keeps its bucket while that bucket is eligible,
// and removing a bucket moves only the keys that were on it (each to its
// second-highest score). Requests without a key use Fallback (least-used
// when nil).
type Affinity struct{ Fallback Strategy }

// Rank implements Strategy.
func (a Affinity) Rank(req Request, cands []Candidate) []Candidate {
	if req.AffinityKey == "" {
		if a.Fallback == nil {
			return LeastUsed{}.Rank(req, cands)
		}
		return a.Fallback.Rank(req, cands)
	}
	type scored struct {
		c Candidate
		s uint64
	}
	sc := make([]scored, len(cands))
	for i, c := range cands {
		sc[i] = scored{c, rendezvous(c.ID, req.AffinityKey)}
	}
	slices.SortStableFunc(sc, func(x, y scored) int {
		if c := cmp.Compare(y.s, x.s); c != 0 {
			return c
		}
		return cmp.Compare(x.c.ID, y.c.ID)
	})
	out := make([]Candidate, len(sc))
	for i, s := range sc {
		out[i] = s.c
	}
	return out
}

func rendezvous(id, key string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(id))
	h.Write([]byte{0})
	h.Write([]byte(key))
	return mix(h.Sum64())
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
