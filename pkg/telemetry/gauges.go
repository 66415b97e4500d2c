package telemetry

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
)

// Bucket states as the bucketlb.bucket.state gauge labels them.
const (
	StateActive   = "active"
	StateDraining = "draining"
	StateDisabled = "disabled"
)

// BucketStat is one bucket's state as the allocator sees it at a scrape.
type BucketStat struct {
	// ID is the bucket id (the bucket label).
	ID string
	// State is StateActive, StateDraining or StateDisabled.
	State               string
	UsedBytes           int64
	ReservedBytes       int64
	LimitBytes          int64
	HealthScore         float64 // 0-100
	ConsecutiveFailures int64
	CoolingDown         bool
}

// ObserveBuckets calls fn at every scrape and publishes the
// bucketlb_bucket_* gauges from its result (allocator service, every
// replica: dashboards take max by bucket). fn runs on the scrape path:
// answer from the watch cache, never from a call to etcd. Buckets missing
// from one answer disappear from the next scrape. Unregister the result
// before what fn reads is closed.
func (m *Metrics) ObserveBuckets(fn func(context.Context) []BucketStat) (metric.Registration, error) {
	if m == nil {
		return metricnoop.Meter{}.RegisterCallback(nil)
	}
	return m.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		for _, b := range fn(ctx) {
			byBucket := metric.WithAttributeSet(attribute.NewSet(attribute.String("bucket", b.ID)))
			o.ObserveInt64(m.bucketUsed, b.UsedBytes, byBucket)
			o.ObserveInt64(m.bucketReserved, b.ReservedBytes, byBucket)
			o.ObserveInt64(m.bucketLimit, b.LimitBytes, byBucket)
			o.ObserveFloat64(m.bucketHealth, b.HealthScore, byBucket)
			o.ObserveInt64(m.bucketFailures, b.ConsecutiveFailures, byBucket)
			o.ObserveInt64(m.bucketCooling, boolInt(b.CoolingDown), byBucket)
			states := []string{StateActive, StateDraining, StateDisabled}
			known := false
			for _, s := range states {
				known = known || s == b.State
			}
			if !known && b.State != "" {
				states = append(states, b.State)
			}
			for _, s := range states {
				o.ObserveInt64(m.bucketState, boolInt(s == b.State), metric.WithAttributes(
					attribute.String("bucket", b.ID), attribute.String("state", s)))
			}
		}
		return nil
	}, m.bucketUsed, m.bucketReserved, m.bucketLimit, m.bucketHealth, m.bucketFailures, m.bucketCooling, m.bucketState)
}

// AllocatorStat is one allocator replica's view of its dependencies.
type AllocatorStat struct {
	// EtcdReachable is true while the replica's etcd client reaches a
	// member with quorum (e.g. its last request or watch progress within a
	// few seconds succeeded).
	EtcdReachable bool
	// Leading is true on the replica elected to run the periodic jobs.
	Leading bool
}

// ObserveAllocator calls fn at every scrape and publishes bucketlb_etcd_up
// and bucketlb_allocator_leader (allocator service). fn must not block.
func (m *Metrics) ObserveAllocator(fn func(context.Context) AllocatorStat) (metric.Registration, error) {
	if m == nil {
		return metricnoop.Meter{}.RegisterCallback(nil)
	}
	return m.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		s := fn(ctx)
		o.ObserveInt64(m.etcdUp, boolInt(s.EtcdReachable))
		o.ObserveInt64(m.leader, boolInt(s.Leading))
		return nil
	}, m.etcdUp, m.leader)
}

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}
