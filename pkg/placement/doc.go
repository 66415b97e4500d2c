// Package placement holds the strategies that choose a bucket among the
// eligible ones.
//
// Eligibility is decided by the caller before a strategy runs: only buckets
// that are ACTIVE, not cooling down (package health) and have room for the
// declared size are passed in as Candidates. A strategy only orders them.
// Rank returns every candidate, best first; the rest are fallbacks in order,
// used when a reservation on an earlier one fails (another replica took the
// room, or a half-open bucket's single trial was already claimed). Pick
// returns just the first choice.
//
// The strategies:
//
//   - priority-first: lowest Priority number wins; ties go to the least used.
//   - least-used: lowest (used+reserved)/limit.
//   - weighted round robin: nginx's smooth weighted round robin, weights
//     e.g. 3:2:1. Each replica keeps its own state; every replica's sequence
//     follows the weights exactly over each cycle, so the union over
//     replicas does too, within one cycle per replica, without sharing
//     state through etcd.
//   - affinity: rendezvous (highest random weight) hashing on the request's
//     affinity key. A key keeps its bucket while that bucket is eligible;
//     removing a bucket moves only the keys that were on it. Requests without
//     a key fall back to least-used.
//   - latency-aware: power of two random choices on the EWMA latency.
//   - random: uniform.
//
// Every strategy is safe for concurrent use. Randomness is injected (New's
// rnd) so tests are deterministic.
package placement
