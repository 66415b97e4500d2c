// Package ledger keeps bucketlb's shared state in etcd: bucket specs,
// committed usage per bucket and period, capacity blocks and leased
// reservations. Every allocator replica uses it; etcd transactions make
// them agree.
//
// Key schema (all under a configurable prefix, default "/bucketlb/"):
//
//	buckets/<bucket>                     BucketSpec as protojson
//	seeded                               set once the config's buckets were written
//	usage/<period>/<bucket>              admin-set base usage, decimal bytes
//	ushard/<period>/<bucket>/<replica>   bytes committed through one replica
//	cap/blocks/<bucket>/<owner>          bytes of free capacity a replica holds,
//	                                     under the replica's lease; owner is
//	                                     "<replica>.<lease id hex>", one per
//	                                     lease term
//	cap/res/<owner>/<bucket>/<random>    {size, bucket, replica: owner, expires},
//	                                     carved inside the owner's block, under
//	                                     its lease; the reservation id is
//	                                     "<owner>~<random>", so any replica finds
//	                                     the key, and each replica watches only
//	                                     its own reservations
//	commits/<reservation>                commit marker; makes Commit exactly-once
//	idem/<sha256(idempotency key)>       first upload's result, written with the
//	                                     usage in the commit transaction
//	idemclaim/<sha256(idempotency key)>  "<token> <lapses, unix ns>": the upload
//	                                     holding the key while it runs
//
// Invariant (no overcommit): for every bucket, base usage plus all usage
// shards plus all blocks never exceeds the monthly limit, at every etcd
// revision. A block only grows by a compare-and-put guarded by the mod
// revisions of every usage key and every block of the bucket (near the
// turn of a period, those of both periods: see turnMargin); a commit
// moves bytes from the committing replica's block into its own shard in
// one transaction, so the sum never grows. Reservations are carved inside
// blocks without compares (in batches), so the hot bucket has no hot key.
//
// Each replica keeps a local view of its block (bytes, mod revision, and
// the revision at which it was last known) and of the reservations carved
// in it. A reservation is dropped from the view only together with a view
// of the block at least as new as the reservation's deletion, because
// another replica may have committed it by shrinking the block in the same
// transaction: a deletion seen on the watch is followed by a read of the
// block before the bytes are freed. Only a reservation under its owner's
// own key prefix may be committed out of the owner's block, so the owner
// always sees that deletion.
//
// Every write is idempotent by construction (etcd write errors may be
// ambiguous): a retried Commit finds its marker and returns the recorded
// answer; ambiguous block or shard writes are followed by a re-read;
// Release deletes a key that may already be gone.
package ledger
