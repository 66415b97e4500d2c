// Package probe is the leader's active health check: it asks every bucket
// whether it answers, through a small Prober interface, and reports the
// outcomes to the shared health model (package health).
//
// A probe follows the same gate as traffic (health.Store.Admit): healthy
// buckets are probed to keep their score and latency current; buckets
// cooling down are left alone until their cooldown runs out; a half-open
// bucket is probed only by claiming its single trial, so a probe can be the
// trial that restores full traffic (or, failing, starts a longer cooldown)
// without waiting for an upload to take the risk. A probe reads, so its
// success says nothing of writes: it neither ends a run of failures that
// uploads took part in nor takes the trial after one (health.ReportProbe,
// health.AdmitProbe).
//
// ReadProber probes through package objstore with a one-byte read of a
// fixed key, a Class B operation on R2 (far cheaper than a PUT); a missing
// key still proves the bucket answers, a missing bucket does not.
//
// Job.Run fits leader.Job's Run, so only the elected replica probes.
package probe
