package health

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// maxBatch bounds the successes buffered per bucket; the next one is
// written at once together with the batch.
const maxBatch = 256

// batch is a bucket's buffered successes, oldest first, and view: the
// cached record at revision rev with them applied. Keeping the view makes
// each buffered success one window update rather than one per success
// buffered before it.
type batch struct {
	latencies []time.Duration
	view      Record
	rev       int64
	viewed    bool
}

// applyTo folds the successes into r's window and latency. They were
// buffered while the bucket had no failures, so they do not reset failures
// counted since.
func (b *batch) applyTo(r *Record, window int) {
	if b == nil || len(b.latencies) == 0 {
		return
	}
	r.Recent = pushed(r.Recent, true, len(b.latencies), window)
	for _, l := range b.latencies {
		r.observeLatency(l)
	}
}

// remember caches rec at revision rev unless the cache knows a newer one.
func (s *Store) remember(bucket string, rec Record, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.cache[bucket]; ok && e.rev >= rev {
		return
	}
	s.cache[bucket] = entry{rec: rec, rev: rev}
}

// forget marks bucket deleted at revision rev.
func (s *Store) forget(bucket string, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.cache[bucket]; ok && e.rev >= rev {
		return
	}
	s.cache[bucket] = entry{rev: rev, deleted: true}
}

// lookup returns the cached record; known is false when the cache cannot
// tell (not synced and nothing cached). A synced cache without an entry
// means a healthy bucket with no record yet.
func (s *Store) lookup(bucket string) (Record, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.cache[bucket]
	if ok && !e.deleted {
		return e.rec.clone(), true
	}
	return Record{}, s.synced
}

// syncedEntry returns the cached record and its mod revision (0 when the
// key is absent) if the cache is synced.
func (s *Store) syncedEntry(bucket string) (Record, int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.synced {
		return Record{}, 0, false
	}
	e, ok := s.cache[bucket]
	if !ok || e.deleted {
		// Absent as far as the cache knows. A stale answer costs one
		// failed compare, which returns the real value.
		return Record{}, 0, true
	}
	return e.rec.clone(), e.rev, true
}

// Cached returns the last known shared record of bucket (without this
// replica's batched successes). ok is false when none is known.
func (s *Store) Cached(bucket string) (Record, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.cache[bucket]
	if !ok || e.deleted {
		return Record{}, false
	}
	return e.rec.clone(), true
}

// Snapshot returns a copy of every known record by bucket ID. Buckets
// without a record are healthy.
func (s *Store) Snapshot() map[string]Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]Record, len(s.cache))
	for id, e := range s.cache {
		if !e.deleted {
			out[id] = e.rec.clone()
		}
	}
	return out
}

// buffer batches a success when that is safe: Run is keeping the cache
// and will flush, and the bucket is known to be fully healthy. It returns
// the record with the batch applied.
func (s *Store) buffer(bucket string, latency time.Duration) (Record, bool) {
	if s.policy.FlushEvery < 0 {
		return Record{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.synced {
		return Record{}, false
	}
	e := s.cache[bucket]
	if !e.deleted && (e.rec.Failures != 0 || !e.rec.CooldownUntil.IsZero() || !e.rec.TrialUntil.IsZero()) {
		return Record{}, false
	}
	b := s.pending[bucket]
	if b == nil {
		b = &batch{}
		s.pending[bucket] = b
	}
	if len(b.latencies) >= maxBatch {
		return Record{}, false
	}
	b.latencies = append(b.latencies, latency)
	if b.viewed && b.rev == e.rev {
		b.view.observe(true, latency, s.policy.Window)
		return b.view, true
	}
	// The cache moved on (or this is the batch's first success): apply the
	// whole batch to the current record. Windows are never written in
	// place, so the cached record needs no copy.
	r := Record{}
	if !e.deleted {
		r = e.rec
	}
	b.applyTo(&r, s.policy.Window)
	b.view, b.rev, b.viewed = r, e.rev, true
	return r, true
}

func (s *Store) takeBatch(bucket string) *batch {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.pending[bucket]
	delete(s.pending, bucket)
	return b
}

// flush writes every buffered batch. A batch whose write fails is dropped
// (the write may have applied; successes only feed the score).
func (s *Store) flush(ctx context.Context) {
	s.mu.Lock()
	todo := s.pending
	s.pending = map[string]*batch{}
	s.mu.Unlock()
	for _, bucket := range sortedKeys(todo) {
		b := todo[bucket]
		_, _, _ = s.update(ctx, bucket, func(r *Record) bool {
			b.applyTo(r, s.policy.Window)
			return true
		})
	}
}

func sortedKeys(m map[string]*batch) []string { return slices.Sorted(maps.Keys(m)) }

// Run keeps the cache current from a watch, and writes batched successes,
// until ctx ends. It re-reads every record after ErrCompacted or any other
// watch failure, and retries while etcd is unreachable. It returns nil
// when ctx ends, after a last flush.
func (s *Store) Run(ctx context.Context) error {
	flushed := make(chan struct{})
	go func() {
		defer close(flushed)
		if s.policy.FlushEvery < 0 {
			return
		}
		t := time.NewTicker(s.policy.FlushEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), opTimeout)
				s.flush(fctx)
				cancel()
				return
			case <-t.C:
				s.flush(ctx)
			}
		}
	}()
	for ctx.Err() == nil {
		rev, err := s.load(ctx)
		if err == nil {
			err = s.watch(ctx, rev+1)
		}
		s.mu.Lock()
		s.synced = false
		s.mu.Unlock()
		if ctx.Err() != nil {
			break
		}
		wait := 500 * time.Millisecond
		if errors.Is(err, rpctypes.ErrCompacted) {
			wait = 0 // the watch fell behind; re-read at once
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	<-flushed
	return nil
}

// load replaces the cache with every stored record and returns the
// revision it reflects.
func (s *Store) load(ctx context.Context) (int64, error) {
	cctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	resp, err := s.cli.Get(cctx, s.prefix, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("health: load: %w", err)
	}
	fresh := map[string]entry{}
	for _, kv := range resp.Kvs {
		if r, rev, err := decode(kv); err == nil {
			fresh[string(kv.Key[len(s.prefix):])] = entry{rec: r, rev: rev}
		}
	}
	s.mu.Lock()
	// Local writes newer than the read survive.
	for id, e := range s.cache {
		if f, ok := fresh[id]; (!ok && e.rev > resp.Header.Revision) || (ok && e.rev > f.rev) {
			fresh[id] = e
		}
	}
	s.cache = fresh
	s.synced = true
	s.mu.Unlock()
	return resp.Header.Revision, nil
}

// watch applies changes from revision from on, until ctx ends or the watch
// fails.
func (s *Store) watch(ctx context.Context, from int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for wr := range s.cli.Watch(wctx, s.prefix, clientv3.WithPrefix(), clientv3.WithRev(from)) {
		if err := wr.Err(); err != nil {
			return fmt.Errorf("health: watch from revision %d: %w", from, err)
		}
		for _, ev := range wr.Events {
			id := string(ev.Kv.Key[len(s.prefix):])
			if ev.Type == clientv3.EventTypeDelete {
				s.forget(id, ev.Kv.ModRevision)
				continue
			}
			if r, rev, err := decode(ev.Kv); err == nil {
				s.remember(id, r, rev)
			}
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return errors.New("health: watch closed")
}
