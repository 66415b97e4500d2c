package probe

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/bucketlb/bucketlb/pkg/health"
)

// Prober checks one bucket. A nil error means the bucket answered; an
// error wrapping ErrNotProbed means the bucket was not asked.
type Prober interface {
	Probe(ctx context.Context, bucketID string) error
}

// ErrNotProbed: the prober could not ask the bucket (e.g. this replica
// lacks its keys). Nothing is reported about the bucket.
var ErrNotProbed = errors.New("probe: bucket not probed")

// Job probes buckets and reports the outcomes.
type Job struct {
	Health *health.Store
	Prober Prober
	// Buckets lists the IDs to probe on each run (e.g. every bucket that
	// is not DISABLED).
	Buckets func() []string
	// Timeout bounds each probe; default 5 s. A probe that times out is a
	// failure.
	Timeout time.Duration
	// Parallel probes at most this many buckets at once; default 4.
	Parallel int
	// Log may be nil.
	Log *slog.Logger
}

// Run probes every bucket once and returns when all probes are done or
// ctx ends. Outcomes are not reported once ctx has ended: a probe cut
// short by the end of leadership says nothing about the bucket.
func (j *Job) Run(ctx context.Context) {
	timeout := j.Timeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	parallel := j.Parallel
	if parallel <= 0 {
		parallel = 4
	}
	log := j.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, id := range j.Buckets() {
		// Healthy: yes. Cooling down: no. Half-open: only if this probe
		// wins the single trial, and only if probes alone cooled it down.
		ok, err := j.Health.AdmitProbe(ctx, id)
		if err != nil {
			log.Warn("cannot read bucket health; probe skipped", "bucket", id, "error", err.Error())
			continue
		}
		if !ok {
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			pctx, cancel := context.WithTimeout(ctx, timeout)
			t0 := time.Now()
			err := j.Prober.Probe(pctx, id)
			latency := time.Since(t0)
			cancel()
			if ctx.Err() != nil {
				return
			}
			rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
			defer rcancel()
			if errors.Is(err, ErrNotProbed) {
				log.Warn("bucket not probed", "bucket", id, "error", err.Error())
				// A half-open trial this probe may hold goes back at once.
				if aerr := j.Health.AbandonTrial(rctx, id); aerr != nil {
					log.Warn("could not give back a probe's trial", "bucket", id, "error", aerr.Error())
				}
				return
			}
			if _, rerr := j.Health.ReportProbe(rctx, id, err == nil, latency); rerr != nil {
				log.Warn("could not record probe result", "bucket", id, "error", rerr.Error())
			}
			if err != nil {
				log.Warn("bucket probe failed", "bucket", id, "error", err.Error())
			}
		}()
	}
}
