package uploader

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bucketlb/bucketlb/pkg/ratelimit"
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
//
// Each client (as the rate limiter names it) may hold at most share bytes
// of the budget, or one call's buffers when they are larger: without it
// one client opening streams that declare large sizes and then idle holds
// the whole budget until the idle timeout, and every other client waits.
type bufferBudget struct {
	sem     *semaphore.Weighted
	total   int64
	share   int64
	wait    time.Duration
	metrics *telemetry.Metrics
	log     *slog.Logger
	held    atomic.Int64
	peak    atomic.Int64 // the most ever held at once
	waiting atomic.Int64 // callers of acquire waiting for room

	mu      sync.Mutex
	clients map[string]*clientShare // clients holding or awaiting room
}

// clientShare is one client's part of the budget; it is dropped when no
// call of the client holds or awaits room.
type clientShare struct {
	sem   *semaphore.Weighted
	calls int
}

func newBufferBudget(total, share int64, wait time.Duration, m *telemetry.Metrics, log *slog.Logger) *bufferBudget {
	return &bufferBudget{sem: semaphore.NewWeighted(total), total: total, share: min(share, total), wait: wait, metrics: m, log: log,
		clients: map[string]*clientShare{}}
}

// acquire takes n bytes of the budget (all of it when n is larger) for the
// client of ctx, waiting at most b.wait in all. When the client's own share
// stays full it fails with RESOURCE_EXHAUSTED, when the replica's budget
// does with UNAVAILABLE, both with a retry delay: the client slows down, or
// retries, perhaps on another replica.
func (b *bufferBudget) acquire(ctx context.Context, n int64) (release func(), err error) {
	n = min(n, b.total)
	client := ratelimit.ClientID(ctx)
	cs := b.join(client)
	mine := min(n, b.share)
	var deadline time.Time
	if !cs.sem.TryAcquire(mine) {
		deadline = time.Now().Add(b.wait)
		if err := b.await(ctx, cs.sem, mine, deadline, func() error {
			b.log.Warn("a client kept its whole share of the upload buffers busy", "client", client, "share_bytes", b.share, "waited", b.wait)
			return &shareFull{retryLater(codes.ResourceExhausted, fmt.Sprintf(
				"this client's calls already hold its share of this upload replica's buffers (%d bytes) and held it for %v; let them finish or retry shortly", b.share, b.wait))}
		}); err != nil {
			b.leave(client, cs)
			return nil, err
		}
	}
	if !b.sem.TryAcquire(n) {
		if deadline.IsZero() {
			deadline = time.Now().Add(b.wait)
		}
		if err := b.await(ctx, b.sem, n, deadline, func() error {
			return retryLater(codes.Unavailable, fmt.Sprintf(
				"this upload replica's buffers (%d bytes) stayed in use by other uploads for %v; retry shortly", b.total, b.wait))
		}); err != nil {
			cs.sem.Release(mine)
			b.leave(client, cs)
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
		cs.sem.Release(mine)
		b.leave(client, cs)
	}, nil
}

func (b *bufferBudget) join(client string) *clientShare {
	b.mu.Lock()
	defer b.mu.Unlock()
	cs := b.clients[client]
	if cs == nil {
		cs = &clientShare{sem: semaphore.NewWeighted(b.share)}
		b.clients[client] = cs
	}
	cs.calls++
	return cs
}

func (b *bufferBudget) leave(client string, cs *clientShare) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if cs.calls--; cs.calls == 0 {
		delete(b.clients, client)
	}
}

// await waits for n bytes of sem until deadline, counted as waiting
// meanwhile: a replica whose calls keep waiting needs company. It returns
// full() when the time runs out.
func (b *bufferBudget) await(ctx context.Context, sem *semaphore.Weighted, n int64, deadline time.Time, full func() error) error {
	b.waiting.Add(1)
	defer b.waiting.Add(-1)
	defer b.metrics.TrackBufferWait(ctx)()
	wctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	if err := sem.Acquire(wctx, n); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return full()
	}
	return nil
}

// shareFull is the answer to a client whose own calls hold its whole
// share: a status like any other, which the metrics count as the caller's
// doing.
type shareFull struct{ err error }

func (e *shareFull) Error() string              { return e.err.Error() }
func (e *shareFull) GRPCStatus() *status.Status { return status.Convert(e.err) }

// retryLater is a status with a one-second retry delay in its details.
func retryLater(code codes.Code, msg string) error { return retryAfter(code, time.Second, msg) }

// retryAfter is a status with a retry delay of d in its details.
func retryAfter(code codes.Code, d time.Duration, msg string) error {
	st := status.New(code, msg)
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(d)}); err == nil {
		st = d
	}
	return st.Err()
}
