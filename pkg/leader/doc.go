// Package leader elects one allocator replica through etcd and runs the
// periodic jobs (health probes, janitor, reconciliation) only on it.
//
// Each replica's Elector campaigns with go.etcd.io/etcd/client/v3/concurrency
// (a Session, i.e. a lease kept alive by the client, and an Election on a
// key prefix). The replica whose key has the lowest create revision leads
// and runs every registered Job: once at once, then every Job.Every, each
// with a context that ends the moment leadership does.
//
// Leadership ends in three ways:
//   - the Elector's context ends (shutdown): jobs stop, it resigns and
//     revokes its lease, so another replica takes over at once instead of
//     after the lease TTL;
//   - the session is lost (lease expired or revoked, etcd unreachable for a
//     TTL, client closed): jobs stop and Leading turns false at once, since
//     another replica may already lead; it then campaigns again;
//   - the process dies: its lease expires after the TTL and the next
//     candidate takes over.
//
// A job must return promptly when its context ends; a dead leader keeps
// leading for at most the session TTL, so jobs must tolerate a short
// overlap with the next leader's first run (they are all idempotent in
// bucketlb).
package leader
