package allocator

import (
	"context"
	"errors"
	"time"

	"go.opentelemetry.io/otel/metric"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

// etcdStale is how old the usage view may grow before this replica says
// it cannot reach etcd: the view is read (with quorum) every 200 ms, and
// a failed read gives up within seconds.
const etcdStale = 5 * time.Second

// observe publishes, at every scrape, the bucket gauges and this
// replica's view of etcd and the election. Both answer from the caches
// Run keeps (buckets, health, the usage view), never from a call to etcd,
// so a scrape neither waits on nor loads etcd.
func (s *Server) observe() error {
	if s.cfg.Metrics == nil {
		return nil
	}
	buckets, err := s.cfg.Metrics.ObserveBuckets(s.bucketStats)
	if err != nil {
		return err
	}
	self, err := s.cfg.Metrics.ObserveAllocator(s.allocatorStat)
	if err != nil {
		return errors.Join(err, buckets.Unregister())
	}
	s.observers = []metric.Registration{buckets, self}
	return nil
}

// bucketStats is every bucket as this replica last saw it. Usage is the
// last successful read: while etcd is unreachable it stays as it was, and
// bucketlb_etcd_up says so.
func (s *Server) bucketStats(context.Context) []telemetry.BucketStat {
	var usage map[string]ledger.Usage
	if v := s.usage.Load(); v != nil {
		usage = v.usage
	}
	now, policy := s.cfg.Now(), s.health.Policy()
	var out []telemetry.BucketStat
	for _, b := range sortedBuckets(s.bucketMap()) {
		u := usage[b.GetId()]
		rec, _ := s.health.Cached(b.GetId())
		out = append(out, telemetry.BucketStat{
			ID: b.GetId(), State: stateLabel(b.GetState()),
			UsedBytes: u.Used, ReservedBytes: u.Reserved, LimitBytes: b.GetMonthlyLimitBytes(),
			HealthScore: float64(rec.Score()), ConsecutiveFailures: int64(rec.Failures), CoolingDown: rec.CoolingDown(now, policy),
		})
	}
	return out
}

func (s *Server) allocatorStat(context.Context) telemetry.AllocatorStat {
	v := s.usage.Load()
	return telemetry.AllocatorStat{
		EtcdReachable: v != nil && time.Since(v.at) < etcdStale,
		Leading:       s.elector.Leading(),
	}
}

func stateLabel(st adminv1.BucketState) string {
	switch st {
	case adminv1.BucketState_BUCKET_STATE_ACTIVE:
		return telemetry.StateActive
	case adminv1.BucketState_BUCKET_STATE_DRAINING:
		return telemetry.StateDraining
	case adminv1.BucketState_BUCKET_STATE_DISABLED:
		return telemetry.StateDisabled
	}
	return "unspecified"
}
