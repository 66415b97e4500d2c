package uploader

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

// bufferBudget bounds the bytes of object and part buffers that all
// uploads (and reads) on this replica hold at once. Per stream memory is
// already two parts; without a bound across streams a burst of large
// uploads would push the process past its memory limit, and the OOM kill
// would fail every upload on the replica, not just the excess. An upload
// takes its whole share before its first buffer, so none waits holding a
// part of it (no deadlock), and while it waits its data stays in gRPC flow
// control.
type bufferBudget struct {
	sem     *semaphore.Weighted
	total   int64
	wait    time.Duration
	metrics *telemetry.Metrics
	held    atomic.Int64
	peak    atomic.Int64 // the most ever held at once
	waiting atomic.Int64 // callers of acquire waiting for room
}

func newBufferBudget(total int64, wait time.Duration, m *telemetry.Metrics) *bufferBudget {
	return &bufferBudget{sem: semaphore.NewWeighted(total), total: total, wait: wait, metrics: m}
}

// acquire takes n bytes of the budget (all of it when n is larger), waiting
// at most b.wait; it fails with UNAVAILABLE and a retry delay when nothing
// frees in time, so the client retries, perhaps on another replica.
func (b *bufferBudget) acquire(ctx context.Context, n int64) (release func(), err error) {
	n = min(n, b.total)
	if !b.sem.TryAcquire(n) {
		if err := b.await(ctx, n); err != nil {
			return nil, err
		}
	}
	held := b.held.Add(n)
	for p := b.peak.Load(); held > p && !b.peak.CompareAndSwap(p, held); p = b.peak.Load() {
	}
	tracked := b.metrics.TrackUploadBuffer(ctx, n)
	return func() {
		tracked()
		b.held.Add(-n)
		b.sem.Release(n)
	}, nil
}

// await waits for n bytes of the budget, at most b.wait, counted as
// waiting meanwhile: a replica whose calls keep waiting needs company.
func (b *bufferBudget) await(ctx context.Context, n int64) error {
	b.waiting.Add(1)
	defer b.waiting.Add(-1)
	defer b.metrics.TrackBufferWait(ctx)()
	wctx, cancel := context.WithTimeout(ctx, b.wait)
	defer cancel()
	if err := b.sem.Acquire(wctx, n); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		st := status.New(codes.Unavailable, fmt.Sprintf(
			"this upload replica's buffers (%d bytes) stayed in use by other uploads for %v; retry shortly", b.total, b.wait))
		if d, derr := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(time.Second)}); derr == nil {
			st = d
		}
		return st.Err()
	}
	return nil
}
