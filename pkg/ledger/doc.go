// Package ledger keeps bucketlb's shared state in etcd: bucket specs,
// committed usage per bucket and period, and leased reservations. Every
// allocator replica uses it; etcd transactions make them agree.
//
// Key schema (all under a configurable prefix, default "/bucketlb/"):
//
//	buckets/<bucket>               BucketSpec as protojson
//	seeded                         set once the config's buckets were written
//	usage/<period>/<bucket>        committed bytes, decimal
//	res/<bucket>/<reservation>     reserved bytes (JSON), attached to the
//	                               reservation's own lease: a holder that
//	                               stops renewing loses it within its TTL
//	commits/<reservation>          commit marker (JSON result), attached to a
//	                               long lease; makes Commit exactly-once
//
// Invariant (no overcommit): for every bucket, usage of the current period
// plus the bytes of all live reservations never exceeds the monthly limit,
// at every etcd revision. Reserve and the re-establishing paths of Renew and
// Commit check capacity and write in ONE transaction that compares the
// usage key's and the whole reservation prefix's mod revisions against
// the revision the check was made at, so a concurrent writer forces a
// re-read instead of an overcommit. Commit moves a reservation's bytes
// into usage in one transaction guarded by the commit marker.
//
// Every write is idempotent by construction (etcd write errors may be
// ambiguous): a retried Reserve creates a new reservation only under a new
// id, a retried Commit finds its marker and returns the recorded answer,
// Release deletes a key that may already be gone.
package ledger
