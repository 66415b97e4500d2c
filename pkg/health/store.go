package health

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrContended means a record kept changing under every attempt to update
// it; the outcome was not recorded.
var ErrContended = errors.New("health: too many concurrent updates")

// maxAttempts bounds compare-and-put retries of one update.
const maxAttempts = 64

// opTimeout bounds each etcd call, so a caller without a deadline does not
// hang while etcd is unreachable.
const opTimeout = 2 * time.Second

// Store reads and writes health records, with a watch-fed cache (Run).
// It is safe for concurrent use.
type Store struct {
	cli    *clientv3.Client
	prefix string
	now    func() time.Time
	policy Policy

	mu      sync.Mutex
	cache   map[string]entry // bucket → last known record, newest revision wins
	synced  bool             // Run has loaded the prefix and is watching it
	pending map[string]*batch
	queues  map[string]*queue // outcomes waiting to be written, per bucket
}

// entry is a cached record at the key's mod revision; deleted marks a
// tombstone so that an older event cannot bring a reset record back.
type entry struct {
	rec     Record
	rev     int64
	deleted bool
}

// NewStore returns a store for keys under prefix (default "/bucketlb/").
// now is the clock; nil means time.Now.
func NewStore(cli *clientv3.Client, prefix string, now func() time.Time, policy Policy) *Store {
	if prefix == "" {
		prefix = "/bucketlb/"
	}
	if now == nil {
		now = time.Now
	}
	policy.defaults()
	return &Store{
		cli: cli, prefix: prefix + "health/", now: now, policy: policy,
		cache: map[string]entry{}, pending: map[string]*batch{}, queues: map[string]*queue{},
	}
}

// Policy returns the effective policy (defaults filled in).
func (s *Store) Policy() Policy { return s.policy }

// Now returns the store's clock reading.
func (s *Store) Now() time.Time { return s.now() }

func (s *Store) key(bucket string) string { return s.prefix + bucket }

func decode(kv *mvccpb.KeyValue) (Record, int64, error) {
	if kv == nil {
		return Record{}, 0, nil
	}
	var r Record
	if err := json.Unmarshal(kv.Value, &r); err != nil {
		return Record{}, 0, fmt.Errorf("health: decode %s: %w", kv.Key, err)
	}
	return r, kv.ModRevision, nil
}

func (s *Store) get(ctx context.Context, bucket string) (Record, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.key(bucket))
	if err != nil {
		return Record{}, 0, fmt.Errorf("health: read %s: %w", bucket, err)
	}
	if len(resp.Kvs) == 0 {
		return Record{}, 0, nil
	}
	return decode(resp.Kvs[0])
}

// update applies fn to the current record and writes the result with a
// compare on the mod revision, retrying on conflict. fn returns false to
// skip the write (update then returns the record fn saw). fn may run
// several times and must not keep r. The starting value comes from the
// cache when it is synced (a stale one just costs a conflict), else from
// etcd.
func (s *Store) update(ctx context.Context, bucket string, fn func(r *Record) bool) (Record, bool, error) {
	r, rev, ok := s.syncedEntry(bucket)
	if !ok {
		var err error
		if r, rev, err = s.get(ctx, bucket); err != nil {
			return Record{}, false, err
		}
	}
	key := s.key(bucket)
	for attempt := 0; attempt < maxAttempts; attempt++ {
		next := r.clone()
		if !fn(&next) {
			return r, false, nil
		}
		data, err := json.Marshal(next)
		if err != nil {
			return Record{}, false, fmt.Errorf("health: encode %s: %w", bucket, err)
		}
		cctx, cancel := context.WithTimeout(ctx, opTimeout)
		resp, err := s.cli.Txn(cctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, string(data))).Else(clientv3.OpGet(key)).Commit()
		cancel()
		if err != nil {
			// Ambiguous: the write may have applied. Not retried, so an
			// outcome counts at most once.
			return Record{}, false, fmt.Errorf("health: write %s: %w", bucket, err)
		}
		if resp.Succeeded {
			s.remember(bucket, next, resp.Header.Revision)
			return next, true, nil
		}
		if attempt >= 2 {
			// Replicas keep colliding: spread them out a little.
			time.Sleep(rand.N(time.Duration(attempt) * time.Millisecond))
		}
		var kv *mvccpb.KeyValue
		if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
			kv = kvs[0]
		}
		if r, rev, err = decode(kv); err != nil {
			return Record{}, false, err
		}
	}
	return Record{}, false, fmt.Errorf("%w of %s", ErrContended, bucket)
}

// Report records one outcome of a request to bucket (ok = success) and
// returns the bucket's record as this replica now knows it. At the
// threshold of consecutive failures the bucket cools down for every
// replica. Successes on a healthy bucket are batched (see the package
// documentation); everything else is written before Report returns.
// A failed write is not retried by Report; callers should not retry it
// either (the write may have applied).
func (s *Store) Report(ctx context.Context, bucket string, ok bool, latency time.Duration) (Record, error) {
	return s.report(ctx, bucket, ok, false, latency)
}

// ReportProbe is Report for a probe's read: its success ends a run of
// failures only when no upload's failure is in it (see the package
// documentation).
func (s *Store) ReportProbe(ctx context.Context, bucket string, ok bool, latency time.Duration) (Record, error) {
	return s.report(ctx, bucket, ok, true, latency)
}

func (s *Store) report(ctx context.Context, bucket string, ok, probe bool, latency time.Duration) (Record, error) {
	if ok {
		// Buffered only while the bucket has no failures, which a probe's
		// success could not end anyway.
		if r, buffered := s.buffer(bucket, latency); buffered {
			return r, nil
		}
	}
	return s.write(ctx, bucket, &outcome{ok: ok, probe: probe, latency: latency, at: s.now()})
}

// Admit decides whether one request may go to bucket now: always when
// healthy, never while cooling down, and when half-open only for the
// single caller (on any replica) that claims the trial. The caller that
// is admitted to a half-open bucket must Report the outcome.
//
// Healthy and cooling buckets are answered from the cache when Run is
// running; claiming a trial is a compare-and-put in etcd.
func (s *Store) Admit(ctx context.Context, bucket string) (bool, error) {
	return s.admit(ctx, bucket, false)
}

// AdmitProbe is Admit for a probe: a half-open bucket's trial goes to a
// probe only when probes alone cooled it down. Once uploads failed there,
// only an upload can show that writes work again.
func (s *Store) AdmitProbe(ctx context.Context, bucket string) (bool, error) {
	return s.admit(ctx, bucket, true)
}

func (s *Store) admit(ctx context.Context, bucket string, probe bool) (bool, error) {
	now := s.now()
	if r, known := s.lookup(bucket); known {
		if r.Healthy(s.policy) {
			return true, nil
		}
		if r.CoolingDown(now, s.policy) {
			return false, nil
		}
	}
	fresh, won, err := s.update(ctx, bucket, func(r *Record) bool {
		if r.Healthy(s.policy) || r.CoolingDown(now, s.policy) {
			return false
		}
		if now.Before(r.TrialUntil) {
			return false // another caller holds the trial
		}
		if probe && r.WriteFailures > 0 {
			return false
		}
		r.TrialUntil, r.TrialBy = now.Add(s.policy.TrialTimeout), ""
		return true
	})
	if err != nil {
		return false, err
	}
	return won || fresh.Healthy(s.policy), nil
}

// HoldTrial names holder (e.g. a reservation id) as the holder of the
// half-open trial Admit just granted this caller, so that whoever ends
// holder without an outcome, on any replica, can give the trial back
// (ReleaseTrial) instead of blocking the bucket until TrialTimeout.
func (s *Store) HoldTrial(ctx context.Context, bucket, holder string) error {
	now := s.now()
	_, _, err := s.update(ctx, bucket, func(r *Record) bool {
		if !r.HalfOpen(now, s.policy) || !now.Before(r.TrialUntil) || r.TrialBy != "" {
			return false
		}
		r.TrialBy = holder
		return true
	})
	return err
}

// ReleaseTrial gives back the half-open trial holder holds, if it still
// holds it: its request ended without an outcome (e.g. a reservation
// released unused).
func (s *Store) ReleaseTrial(ctx context.Context, bucket, holder string) error {
	if holder == "" {
		return nil
	}
	_, _, err := s.update(ctx, bucket, func(r *Record) bool {
		if r.TrialBy != holder || r.TrialUntil.IsZero() {
			return false
		}
		r.TrialUntil, r.TrialBy = time.Time{}, ""
		return true
	})
	return err
}

// Reset clears a bucket's health on every replica: no failures, no
// cooldown, a fresh score.
func (s *Store) Reset(ctx context.Context, bucket string) error {
	cctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	resp, err := s.cli.Delete(cctx, s.key(bucket))
	if err != nil {
		return fmt.Errorf("health: reset %s: %w", bucket, err)
	}
	s.mu.Lock()
	delete(s.pending, bucket)
	s.mu.Unlock()
	s.forget(bucket, resp.Header.Revision)
	return nil
}

// outcome is one reported result waiting to be written.
type outcome struct {
	ok      bool
	probe   bool // a probe's read, not an upload
	latency time.Duration
	at      time.Time
	done    chan struct{}
	rec     Record
	err     error
}

// queue holds a bucket's outcomes waiting for the writer.
type queue struct {
	waiting []*outcome
	writing bool
}

// write records o through the bucket's queue: concurrent reports of one
// replica are written together in one compare-and-put (group commit), so
// a burst of failures (every upload on a dying bucket fails at once) does
// not turn into dozens of callers conflicting on one key.
func (s *Store) write(ctx context.Context, bucket string, o *outcome) (Record, error) {
	o.done = make(chan struct{})
	s.mu.Lock()
	q := s.queues[bucket]
	if q == nil {
		q = &queue{}
		s.queues[bucket] = q
	}
	q.waiting = append(q.waiting, o)
	start := !q.writing
	q.writing = true
	s.mu.Unlock()
	if start {
		s.drain(context.WithoutCancel(ctx), bucket, q)
	}
	select {
	case <-o.done:
		return o.rec, o.err
	case <-ctx.Done():
		// The outcome is still written; the caller just stops waiting.
		return Record{}, ctx.Err()
	}
}

// drain writes everything queued for bucket in one update, then hands the
// queue to a new goroutine if more arrived meanwhile.
func (s *Store) drain(ctx context.Context, bucket string, q *queue) {
	s.mu.Lock()
	group := q.waiting
	q.waiting = nil
	s.mu.Unlock()
	b := s.takeBatch(bucket)
	rec, _, err := s.update(ctx, bucket, func(r *Record) bool {
		b.applyTo(r, s.policy.Window)
		for _, o := range group {
			r.apply(o.ok, o.probe, o.latency, o.at, s.policy)
		}
		return true
	})
	for _, o := range group {
		o.rec, o.err = rec, err
		close(o.done)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(q.waiting) == 0 {
		q.writing = false
		return
	}
	go s.drain(ctx, bucket, q)
}

// ExtendTrial keeps a half-open bucket's trial out while an upload on it
// is still running (its reservation renewed): a long upload must not let
// a second trial in after TrialTimeout. It writes only when less than half
// the timeout is left, so renewals cost about one write per half timeout.
// The upload renewing may be the trial itself or one let through before
// the cooldown; either tells whether the bucket recovered when it ends.
func (s *Store) ExtendTrial(ctx context.Context, bucket string) error {
	now := s.now()
	due := func(r Record) bool {
		return r.HalfOpen(now, s.policy) && now.Before(r.TrialUntil) && r.TrialUntil.Sub(now) < s.policy.TrialTimeout/2
	}
	if r, known := s.lookup(bucket); known && !due(r) {
		return nil
	}
	_, _, err := s.update(ctx, bucket, func(r *Record) bool {
		if !due(*r) {
			return false
		}
		r.TrialUntil = now.Add(s.policy.TrialTimeout)
		return true
	})
	return err
}

// AbandonTrial gives back a half-open trial that Admit granted but that
// was never sent (e.g. the reservation on the bucket failed), so that the
// next Admit may claim it at once instead of after TrialTimeout. Only the
// caller Admit admitted may call it, and only before reporting an outcome.
func (s *Store) AbandonTrial(ctx context.Context, bucket string) error {
	_, _, err := s.update(ctx, bucket, func(r *Record) bool {
		if r.TrialUntil.IsZero() {
			return false
		}
		r.TrialUntil, r.TrialBy = time.Time{}, ""
		return true
	})
	return err
}
