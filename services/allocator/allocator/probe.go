package allocator

import (
	"context"
	"fmt"
	"time"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// Prober checks that a bucket answers. A nil error means healthy.
type Prober interface {
	Probe(ctx context.Context, b *adminv1.BucketSpec) error
}

// StoreProber probes with a HEAD of a fixed key through objstore: a Class
// B operation (R2 bills HEAD far below PUT), and "not found" still proves
// the bucket answers.
type StoreProber struct{ Store *objstore.Store }

// ProbeKey is the key probes ask for; it need not exist.
const ProbeKey = ".bucketlb-probe"

// Probe implements Prober.
func (p StoreProber) Probe(ctx context.Context, b *adminv1.BucketSpec) error {
	h, err := p.Store.Bucket(objstore.Target{ID: b.GetId(), Name: b.GetName(), Endpoint: b.GetEndpoint(), Region: b.GetRegion(),
		CredentialsRef: b.GetCredentialsRef(), PathStyle: b.GetPathStyle()})
	if err != nil {
		return err
	}
	if _, err := h.Head(ctx, ProbeKey); err != nil && !objstore.IsNotFound(err) {
		return fmt.Errorf("probe %s: %w", b.GetId(), err)
	}
	return nil
}

// probeAll is the leader's probe job. Buckets cooling down are left alone
// (their cooldown must run out); half-open ones are probed only by
// claiming the single trial, so a probe can be that trial.
func (s *Server) probeAll(ctx context.Context) {
	now := s.cfg.Now()
	policy := s.health.Policy()
	for _, b := range sortedBuckets(s.bucketMap()) {
		if b.GetState() == adminv1.BucketState_BUCKET_STATE_DISABLED {
			continue
		}
		rec, _ := s.health.Cached(b.GetId())
		if rec.CoolingDown(now, policy) {
			continue
		}
		if rec.HalfOpen(now, policy) {
			if ok, err := s.health.Admit(ctx, b.GetId()); err != nil || !ok {
				continue
			}
		}
		pctx, cancel := context.WithTimeout(ctx, s.cfg.ProbeTimeout)
		t0 := time.Now()
		err := s.cfg.Prober.Probe(pctx, b)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if _, rerr := s.health.Report(ctx, b.GetId(), err == nil, time.Since(t0)); rerr != nil {
			s.log.Warn("could not record probe result", "bucket", b.GetId(), "error", rerr.Error())
		}
		if err != nil {
			s.log.Warn("bucket probe failed", "bucket", b.GetId(), "error", err.Error())
		}
	}
}
