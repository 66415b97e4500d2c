// Package health keeps each bucket's health in etcd so that every
// allocator replica sees the same cooldown at once (DESIGN invariant 5).
//
// A bucket that fails FailureThreshold times in a row cools down for
// min(MaxCooldown, failures × CooldownStep). After the cooldown exactly
// one trial request is admitted (half-open), claimed with a
// compare-and-swap so only one replica and caller wins; its success
// restores full traffic, its failure starts a longer cooldown.
//
// Key schema: <prefix>health/<bucket> → Record as JSON.
package health

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Policy tunes the model.
type Policy struct {
	FailureThreshold int           // default 3
	CooldownStep     time.Duration // default 5 min
	MaxCooldown      time.Duration // default 30 min
	TrialTimeout     time.Duration // a trial not reported by then may be retried; default 1 min
	Window           int           // outcomes kept for the score; default 20
}

func (p *Policy) defaults() {
	if p.FailureThreshold == 0 {
		p.FailureThreshold = 3
	}
	if p.CooldownStep == 0 {
		p.CooldownStep = 5 * time.Minute
	}
	if p.MaxCooldown == 0 {
		p.MaxCooldown = 30 * time.Minute
	}
	if p.TrialTimeout == 0 {
		p.TrialTimeout = time.Minute
	}
	if p.Window == 0 {
		p.Window = 20
	}
}

// Record is a bucket's shared health.
type Record struct {
	Failures      int       `json:"failures"`
	CooldownUntil time.Time `json:"cooldown_until,omitzero"`
	TrialUntil    time.Time `json:"trial_until,omitzero"`
	Recent        []bool    `json:"recent,omitempty"` // newest last; true = success
	LatencyMS     float64   `json:"latency_ewma_ms"`
}

// CoolingDown reports whether no traffic may go to the bucket at now.
func (r Record) CoolingDown(now time.Time, p Policy) bool {
	return r.Failures >= p.FailureThreshold && now.Before(r.CooldownUntil)
}

// HalfOpen reports whether the bucket only takes a single trial.
func (r Record) HalfOpen(now time.Time, p Policy) bool {
	return r.Failures >= p.FailureThreshold && !now.Before(r.CooldownUntil)
}

// Score is 0–100: the recent success ratio, less up to 30 points for an
// EWMA latency between 200 ms and 2 s.
func (r Record) Score() int {
	if len(r.Recent) == 0 {
		return 100
	}
	ok := 0
	for _, s := range r.Recent {
		if s {
			ok++
		}
	}
	score := 100 * float64(ok) / float64(len(r.Recent))
	if r.LatencyMS > 200 {
		score -= math.Min(30, 30*(r.LatencyMS-200)/1800)
	}
	return int(math.Round(math.Max(0, math.Min(100, score))))
}

// Latency returns the EWMA latency.
func (r Record) Latency() time.Duration {
	return time.Duration(r.LatencyMS * float64(time.Millisecond))
}

// Store reads and writes health records, with a watch-fed cache.
type Store struct {
	cli    *clientv3.Client
	prefix string
	now    func() time.Time
	policy Policy

	mu    sync.RWMutex
	cache map[string]Record
}

// NewStore returns a store. now may be nil (time.Now).
func NewStore(cli *clientv3.Client, prefix string, now func() time.Time, policy Policy) *Store {
	if prefix == "" {
		prefix = "/bucketlb/"
	}
	if now == nil {
		now = time.Now
	}
	policy.defaults()
	return &Store{cli: cli, prefix: prefix + "health/", now: now, policy: policy, cache: map[string]Record{}}
}

// Policy returns the effective policy.
func (s *Store) Policy() Policy { return s.policy }

// Now returns the store's clock reading.
func (s *Store) Now() time.Time { return s.now() }

func (s *Store) key(bucket string) string { return s.prefix + bucket }

func opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, 2*time.Second)
}

func (s *Store) get(ctx context.Context, bucket string) (Record, int64, error) {
	ctx, cancel := opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.key(bucket))
	if err != nil {
		return Record{}, 0, fmt.Errorf("health: read %s: %w", bucket, err)
	}
	if len(resp.Kvs) == 0 {
		return Record{}, 0, nil
	}
	var r Record
	if err := json.Unmarshal(resp.Kvs[0].Value, &r); err != nil {
		return Record{}, 0, fmt.Errorf("health: decode %s: %w", bucket, err)
	}
	return r, resp.Kvs[0].ModRevision, nil
}

// update applies fn with compare-and-swap; fn returns false to skip the write.
func (s *Store) update(ctx context.Context, bucket string, fn func(*Record) bool) (Record, bool, error) {
	for attempt := 0; attempt < 50; attempt++ {
		r, rev, err := s.get(ctx, bucket)
		if err != nil {
			return Record{}, false, err
		}
		if !fn(&r) {
			return r, false, nil
		}
		data, _ := json.Marshal(r)
		cctx, cancel := opCtx(ctx)
		resp, err := s.cli.Txn(cctx).If(clientv3.Compare(clientv3.ModRevision(s.key(bucket)), "=", rev)).
			Then(clientv3.OpPut(s.key(bucket), string(data))).Commit()
		cancel()
		if err != nil {
			return Record{}, false, fmt.Errorf("health: write %s: %w", bucket, err)
		}
		if resp.Succeeded {
			s.mu.Lock()
			s.cache[bucket] = r
			s.mu.Unlock()
			return r, true, nil
		}
	}
	return Record{}, false, errors.New("health: too many concurrent updates")
}

// Report records one outcome. A failed write of a health report is not
// retried by callers: health is advisory, capacity is not.
func (s *Store) Report(ctx context.Context, bucket string, ok bool, latency time.Duration) (Record, error) {
	now := s.now()
	r, _, err := s.update(ctx, bucket, func(r *Record) bool {
		r.Recent = append(r.Recent, ok)
		if over := len(r.Recent) - s.policy.Window; over > 0 {
			r.Recent = append([]bool(nil), r.Recent[over:]...)
		}
		ms := float64(latency) / float64(time.Millisecond)
		if r.LatencyMS == 0 {
			r.LatencyMS = ms
		} else {
			r.LatencyMS = 0.8*r.LatencyMS + 0.2*ms
		}
		if ok {
			r.Failures, r.CooldownUntil, r.TrialUntil = 0, time.Time{}, time.Time{}
			return true
		}
		r.Failures++
		r.TrialUntil = time.Time{}
		if r.Failures >= s.policy.FailureThreshold {
			d := min(s.policy.MaxCooldown, time.Duration(r.Failures)*s.policy.CooldownStep)
			r.CooldownUntil = now.Add(d)
		}
		return true
	})
	return r, err
}

// Admit decides whether one request may go to the bucket now: always
// when healthy, never while cooling down, and when half-open only for the
// single caller that claims the trial.
func (s *Store) Admit(ctx context.Context, bucket string) (bool, error) {
	now := s.now()
	if r, ok := s.Cached(bucket); ok && r.Failures < s.policy.FailureThreshold {
		return true, nil
	}
	fresh, won, err := s.update(ctx, bucket, func(r *Record) bool {
		if r.Failures < s.policy.FailureThreshold || r.CoolingDown(now, s.policy) {
			return false
		}
		if now.Before(r.TrialUntil) {
			return false // another caller holds the trial
		}
		r.TrialUntil = now.Add(s.policy.TrialTimeout)
		return true
	})
	if err != nil {
		return false, err
	}
	if won {
		return true, nil
	}
	s.mu.Lock()
	s.cache[bucket] = fresh
	s.mu.Unlock()
	return fresh.Failures < s.policy.FailureThreshold, nil
}

// Reset clears a bucket's health.
func (s *Store) Reset(ctx context.Context, bucket string) error {
	cctx, cancel := opCtx(ctx)
	defer cancel()
	if _, err := s.cli.Delete(cctx, s.key(bucket)); err != nil {
		return fmt.Errorf("health: reset %s: %w", bucket, err)
	}
	s.mu.Lock()
	delete(s.cache, bucket)
	s.mu.Unlock()
	return nil
}

// Cached returns the last known record of a bucket.
func (s *Store) Cached(bucket string) (Record, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	r, ok := s.cache[bucket]
	return r, ok
}

// Run keeps the cache current from a watch until ctx ends, re-reading
// after compaction or errors.
func (s *Store) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		cctx, cancel := opCtx(ctx)
		resp, err := s.cli.Get(cctx, s.prefix, clientv3.WithPrefix())
		cancel()
		if err != nil {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(500 * time.Millisecond):
			}
			continue
		}
		fresh := map[string]Record{}
		for _, kv := range resp.Kvs {
			var r Record
			if json.Unmarshal(kv.Value, &r) == nil {
				fresh[string(kv.Key[len(s.prefix):])] = r
			}
		}
		s.mu.Lock()
		s.cache = fresh
		s.mu.Unlock()
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for wr := range s.cli.Watch(wctx, s.prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1)) {
			if wr.Err() != nil {
				break
			}
			s.mu.Lock()
			for _, ev := range wr.Events {
				id := string(ev.Kv.Key[len(s.prefix):])
				if ev.Type == clientv3.EventTypeDelete {
					delete(s.cache, id)
					continue
				}
				var r Record
				if json.Unmarshal(ev.Kv.Value, &r) == nil {
					s.cache[id] = r
				}
			}
			s.mu.Unlock()
		}
		wcancel()
	}
	return nil
}
