// Package health keeps each bucket's health in etcd so that every
// allocator replica sees the same cooldown at once (DESIGN invariant 5).
//
// # Model
//
// A bucket that fails FailureThreshold (3) times in a row cools down for
// min(MaxCooldown, failures × CooldownStep), i.e. 15, 20, 25, then 30
// minutes. While cooling down it takes no traffic on any replica. After the
// cooldown the bucket is half-open: Admit lets exactly one trial request
// through, claimed with a compare-and-put so that only one caller on one
// replica wins. The trial's success (any upload's success, in fact)
// restores full traffic; its failure counts one more consecutive failure and starts a
// longer cooldown. A trial never reported (its caller died) expires after
// TrialTimeout, and the next Admit may claim a new one. Outcomes reported
// while a bucket cools down (requests admitted before it began) count in
// the score only: they neither end nor lengthen the cooldown, which thus
// does not depend on how many requests were in flight when the bucket
// broke.
//
// Probes (ReportProbe, AdmitProbe) read; uploads write. A probe's failure
// counts like any other, but its success proves only that the bucket
// answers reads: it ends a run of failures only when probes alone made
// it, and a probe takes a half-open trial only then. A bucket that answers
// reads and refuses writes thus cools down after three uploads in a row
// fail there, however many probes pass between them, and its cooldowns
// grow as its trials (uploads) keep failing.
//
// The score (0–100) is the success ratio over the last Window outcomes,
// less up to 30 points for an EWMA latency between 200 ms and 2 s.
//
// # Storage
//
// Key schema: <prefix>health/<bucket id> → Record as JSON. Every write is
// a transaction comparing the key's mod revision with the one read (retried
// on conflict, with the fresh value returned by the failed transaction
// itself, so a conflict costs one round trip). A write whose outcome is
// ambiguous (timeout, connection lost) is not retried: an outcome is
// recorded at most once. Concurrent reports of one replica for one bucket
// are written together in one such transaction (group commit), so a burst
// of failures on a dying hot bucket does not become dozens of callers
// conflicting on one key. Health is advisory; capacity (package ledger) is
// what must be exact.
//
// # Cache and the hot path
//
// Run feeds a cache from a watch on the prefix (re-reading everything after
// ErrCompacted or any watch failure), so Admit answers from memory for
// healthy and cooling buckets and reads etcd only to claim a half-open
// trial. Snapshot and Cached read the cache.
//
// Successes reported for a bucket that is healthy (no failures, no
// cooldown) are the normal case, one per upload on the hottest bucket.
// While Run is running they are not written one by one: they are batched
// per bucket and folded into the record every FlushEvery (default 1 s), so
// the health key does not become a hot key that every upload on every
// replica compare-and-swaps. Failures, and successes on a bucket that has
// failures, are written at once. A replica that dies loses at most one
// interval of successes, which only affects the score.
//
// Time comes from an injected clock so tests need not wait for minutes.
package health
