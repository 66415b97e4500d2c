package health

import (
	"math"
	"slices"
	"time"
)

// Policy tunes the model. Zero fields take the defaults.
type Policy struct {
	FailureThreshold int           // consecutive failures that start a cooldown; default 3
	CooldownStep     time.Duration // cooldown per consecutive failure; default 5 min
	MaxCooldown      time.Duration // cap on a cooldown; default 30 min
	TrialTimeout     time.Duration // a trial not reported by then may be claimed again; default 1 min
	Window           int           // outcomes kept for the score; default 20
	// FlushEvery is how often batched successes of healthy buckets are
	// written; default 1 s. Negative writes every report at once.
	FlushEvery time.Duration
}

func (p *Policy) defaults() {
	if p.FailureThreshold <= 0 {
		p.FailureThreshold = 3
	}
	if p.CooldownStep <= 0 {
		p.CooldownStep = 5 * time.Minute
	}
	if p.MaxCooldown <= 0 {
		p.MaxCooldown = 30 * time.Minute
	}
	if p.TrialTimeout <= 0 {
		p.TrialTimeout = time.Minute
	}
	if p.Window <= 0 {
		p.Window = 20
	}
	if p.FlushEvery == 0 {
		p.FlushEvery = time.Second
	}
}

// Cooldown is how long a bucket cools down after failures consecutive
// failures: zero below the threshold, else min(MaxCooldown, failures ×
// CooldownStep).
func (p Policy) Cooldown(failures int) time.Duration {
	if failures < p.FailureThreshold {
		return 0
	}
	return min(p.MaxCooldown, time.Duration(failures)*p.CooldownStep)
}

// Record is a bucket's shared health, as stored in etcd.
type Record struct {
	Failures      int       `json:"failures"`                 // consecutive
	WriteFailures int       `json:"write_failures,omitempty"` // of Failures, those uploads reported (the rest are probes')
	CooldownUntil time.Time `json:"cooldown_until,omitzero"`  // set once Failures reaches the threshold
	TrialUntil    time.Time `json:"trial_until,omitzero"`     // a half-open trial is out until then
	TrialBy       string    `json:"trial_by,omitempty"`       // who holds it, once named (HoldTrial)
	Recent        []bool    `json:"recent,omitempty"`         // newest last; true = success
	LatencyMS     float64   `json:"latency_ewma_ms"`          // EWMA, α = 0.2
}

// CoolingDown reports whether no traffic may go to the bucket at now.
func (r Record) CoolingDown(now time.Time, p Policy) bool {
	return r.Failures >= p.FailureThreshold && now.Before(r.CooldownUntil)
}

// HalfOpen reports whether the bucket only takes a single trial at now.
func (r Record) HalfOpen(now time.Time, p Policy) bool {
	return r.Failures >= p.FailureThreshold && !now.Before(r.CooldownUntil)
}

// Healthy reports whether the bucket takes full traffic.
func (r Record) Healthy(p Policy) bool { return r.Failures < p.FailureThreshold }

// Score is 0–100: the recent success ratio, less up to 30 points for an
// EWMA latency between 200 ms and 2 s. A bucket with no outcomes scores
// 100.
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

// Latency returns the EWMA latency; zero when nothing was measured.
func (r Record) Latency() time.Duration {
	return time.Duration(r.LatencyMS * float64(time.Millisecond))
}

func (r Record) clone() Record {
	r.Recent = slices.Clone(r.Recent)
	return r
}

// observe adds one outcome to the window and the latency EWMA; it does not
// touch failures or cooldown.
func (r *Record) observe(ok bool, latency time.Duration, window int) {
	r.Recent = pushed(r.Recent, ok, 1, window)
	r.observeLatency(latency)
}

func (r *Record) observeLatency(latency time.Duration) {
	ms := float64(latency) / float64(time.Millisecond)
	if r.LatencyMS == 0 {
		r.LatencyMS = ms
	} else {
		r.LatencyMS = 0.8*r.LatencyMS + 0.2*ms
	}
}

// pushed returns a new window: recent followed by n outcomes ok, keeping
// the newest window. It always allocates and never writes to recent's
// array, which copies of a record share.
func pushed(recent []bool, ok bool, n, window int) []bool {
	keep := min(len(recent)+n, window)
	added := min(n, keep)
	out := make([]bool, keep)
	copy(out, recent[len(recent)-(keep-added):])
	for i := keep - added; i < keep; i++ {
		out[i] = ok
	}
	return out
}

// apply records one outcome at now: observe, then failures and cooldown
// unless the bucket is cooling down. A probe's success (a read) does not
// end a run of failures uploads took part in: it says nothing of writes.
func (r *Record) apply(ok, probe bool, latency time.Duration, now time.Time, p Policy) {
	r.observe(ok, latency, p.Window)
	if r.CoolingDown(now, p) {
		// A request let through before the cooldown began: its outcome
		// feeds the score but neither ends nor lengthens the cooldown, so
		// the cooldown does not depend on how many requests were in flight.
		return
	}
	if ok && probe && r.WriteFailures > 0 {
		return
	}
	r.TrialUntil, r.TrialBy = time.Time{}, ""
	if ok {
		r.Failures, r.WriteFailures, r.CooldownUntil = 0, 0, time.Time{}
		return
	}
	r.Failures++
	if !probe {
		r.WriteFailures++
	}
	if d := p.Cooldown(r.Failures); d > 0 {
		r.CooldownUntil = now.Add(d)
	}
}
