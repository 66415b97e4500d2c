package telemetry

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ScopeName is the instrumentation scope of the bucketlb instruments
// (the otel_scope_name label in Prometheus).
const ScopeName = "github.com/bucketlb/bucketlb/pkg/telemetry"

// Outcome label values. Dashboards and alerts depend on this exact set;
// Outcome maps an error onto it.
const (
	// OutcomeOK: the call did what was asked.
	OutcomeOK = "ok"
	// OutcomeReplay: an earlier identical call's result was returned
	// (idempotency key or content hash); nothing new was stored.
	OutcomeReplay = "replay"
	// OutcomeRejected: the caller's fault (INVALID_ARGUMENT,
	// FAILED_PRECONDITION, NOT_FOUND, ALREADY_EXISTS, OUT_OF_RANGE,
	// UNAUTHENTICATED, PERMISSION_DENIED, or an Upload marked CallerFault).
	// Left out of success ratios.
	OutcomeRejected = "rejected"
	// OutcomeCanceled: the caller went away (CANCELED). Left out of
	// success ratios.
	OutcomeCanceled = "canceled"
	// OutcomeExhausted: no bucket has room, or a rate limit hit
	// (RESOURCE_EXHAUSTED). Counts as a failure.
	OutcomeExhausted = "exhausted"
	// OutcomeUnavailable: etcd, the allocator or every bucket unreachable,
	// or a deadline passed (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED).
	OutcomeUnavailable = "unavailable"
	// OutcomeFailed: anything else (INTERNAL, UNKNOWN, DATA_LOSS, ...).
	OutcomeFailed = "failed"
)

// Outcome classifies err for the outcome label: nil is OutcomeOK; gRPC
// status errors (also wrapped ones) by code; context errors as canceled
// or unavailable; anything else as failed.
func Outcome(err error) string {
	if err == nil {
		return OutcomeOK
	}
	switch {
	case errors.Is(err, context.Canceled):
		return OutcomeCanceled
	case errors.Is(err, context.DeadlineExceeded):
		return OutcomeUnavailable
	}
	s, ok := status.FromError(err)
	if !ok {
		return OutcomeFailed
	}
	switch s.Code() {
	case codes.OK:
		return OutcomeOK
	case codes.InvalidArgument, codes.FailedPrecondition, codes.NotFound, codes.AlreadyExists,
		codes.OutOfRange, codes.Unauthenticated, codes.PermissionDenied:
		return OutcomeRejected
	case codes.Canceled:
		return OutcomeCanceled
	case codes.ResourceExhausted:
		return OutcomeExhausted
	case codes.Unavailable, codes.DeadlineExceeded, codes.Aborted:
		return OutcomeUnavailable
	default:
		return OutcomeFailed
	}
}

// Metrics are the bucketlb domain instruments. Every method is safe on a
// nil *Metrics (it records nothing), so components can take an optional
// *Metrics without checks. Attribute values must stay bounded: bucket ids
// and the Outcome constants, never object keys or client ids.
type Metrics struct {
	meter metric.Meter

	uploads        metric.Int64Counter
	uploadBytes    metric.Int64Counter
	uploadDuration metric.Float64Histogram
	uploadStreams  metric.Int64UpDownCounter
	uploadBuffers  metric.Int64UpDownCounter
	bufferWaiting  metric.Int64UpDownCounter
	failovers      metric.Int64Counter
	leftovers      metric.Int64Counter
	corruptReads   metric.Int64Counter

	// When the last leftover and corrupt read of each bucket (and kind)
	// happened, as gauges: alerts on rare events read them, since a
	// counter is born with its first event at its count, where
	// increase() sees no rise, and a gap in scrapes makes an old series
	// look new.
	lastLeftover, lastCorrupt lastEvents
	reservations              metric.Int64Counter
	commits                   metric.Int64Counter
	panics                    metric.Int64Counter

	bucketUsed     metric.Int64ObservableGauge
	bucketReserved metric.Int64ObservableGauge
	bucketLimit    metric.Int64ObservableGauge
	bucketHealth   metric.Float64ObservableGauge
	bucketFailures metric.Int64ObservableGauge
	bucketCooling  metric.Int64ObservableGauge
	bucketState    metric.Int64ObservableGauge
	etcdUp         metric.Int64ObservableGauge
	leader         metric.Int64ObservableGauge
}

// NewMetrics creates the instruments on mp. New calls it for the
// Telemetry's own provider; tests of other packages may call it with any
// provider.
func NewMetrics(mp metric.MeterProvider) (*Metrics, error) {
	m := &Metrics{meter: mp.Meter(ScopeName)}
	mt := m.meter
	var errs []error
	check := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	var err error

	m.uploads, err = mt.Int64Counter("bucketlb.uploads",
		metric.WithDescription("Finished Upload calls by outcome."), metric.WithUnit("{upload}"))
	check(err)
	m.uploadBytes, err = mt.Int64Counter("bucketlb.upload.bytes",
		metric.WithDescription("Bytes received in finished Upload calls, by the bucket that took them and outcome."), metric.WithUnit("By"))
	check(err)
	m.uploadDuration, err = mt.Float64Histogram("bucketlb.upload.duration",
		metric.WithDescription("Duration of Upload calls from header to response, by outcome."), metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
	check(err)
	m.uploadStreams, err = mt.Int64UpDownCounter("bucketlb.upload.active_streams",
		metric.WithDescription("Upload streams in progress on this replica (an HPA signal better than CPU)."), metric.WithUnit("{stream}"))
	check(err)
	m.uploadBuffers, err = mt.Int64UpDownCounter("bucketlb.upload.buffer",
		metric.WithDescription("Bytes of object and part buffers the uploads on this replica hold (bounded by upload.bufferBudget)."), metric.WithUnit("By"))
	check(err)
	m.bufferWaiting, err = mt.Int64UpDownCounter("bucketlb.upload.buffer_waiting",
		metric.WithDescription("Uploads and reads on this replica waiting for buffer room (upload.bufferBudget); for long above 0, the replica needs company."), metric.WithUnit("{call}"))
	check(err)
	m.failovers, err = mt.Int64Counter("bucketlb.upload.failovers",
		metric.WithDescription("Buckets an upload left, by the bucket and why (it failed, or this replica lacks its keys), whether or not another bucket then took the upload."), metric.WithUnit("{failover}"))
	check(err)
	m.leftovers, err = mt.Int64Counter("bucketlb.upload.leftovers",
		metric.WithDescription("What failed uploads may have left in a bucket because removing it failed, by bucket and kind (object: bytes no usage counts; multipart: parts until the bucket's lifecycle rule aborts them)."), metric.WithUnit("{leftover}"))
	check(err)
	m.corruptReads, err = mt.Int64Counter("bucketlb.upload.corrupt_reads",
		metric.WithDescription("Whole-object reads whose bytes did not match the sha256 the object was stored with, by bucket (each try of a read counts)."), metric.WithUnit("{read}"))
	check(err)
	_, err = mt.Float64ObservableGauge("bucketlb.upload.last_leftover",
		metric.WithDescription("Unix time of the last leftover (see bucketlb.upload.leftovers) this replica counted, by bucket and kind."), metric.WithUnit("s"),
		metric.WithFloat64Callback(m.lastLeftover.observe))
	check(err)
	_, err = mt.Float64ObservableGauge("bucketlb.upload.last_corrupt_read",
		metric.WithDescription("Unix time of the last corrupt read (see bucketlb.upload.corrupt_reads) this replica counted, by bucket."), metric.WithUnit("s"),
		metric.WithFloat64Callback(m.lastCorrupt.observe))
	check(err)
	m.reservations, err = mt.Int64Counter("bucketlb.allocator.reservations",
		metric.WithDescription("Allocate calls by the bucket chosen (empty when none) and outcome."), metric.WithUnit("{reservation}"))
	check(err)
	m.commits, err = mt.Int64Counter("bucketlb.allocator.commits",
		metric.WithDescription("Commit calls by bucket and outcome (replay: already committed)."), metric.WithUnit("{commit}"))
	check(err)
	m.panics, err = mt.Int64Counter("bucketlb.grpc.panics",
		metric.WithDescription("Handler panics turned into INTERNAL, by gRPC method."), metric.WithUnit("{panic}"))
	check(err)

	m.bucketUsed, err = mt.Int64ObservableGauge("bucketlb.bucket.used",
		metric.WithDescription("Bytes committed to the bucket in the current period."), metric.WithUnit("By"))
	check(err)
	m.bucketReserved, err = mt.Int64ObservableGauge("bucketlb.bucket.reserved",
		metric.WithDescription("Bytes held by live reservations on the bucket."), metric.WithUnit("By"))
	check(err)
	m.bucketLimit, err = mt.Int64ObservableGauge("bucketlb.bucket.limit",
		metric.WithDescription("The bucket's monthly byte budget."), metric.WithUnit("By"))
	check(err)
	m.bucketHealth, err = mt.Float64ObservableGauge("bucketlb.bucket.health_score",
		metric.WithDescription("Health score 0-100 from recent outcomes and latency."))
	check(err)
	m.bucketFailures, err = mt.Int64ObservableGauge("bucketlb.bucket.consecutive_failures",
		metric.WithDescription("Failures in a row reported for the bucket."))
	check(err)
	m.bucketCooling, err = mt.Int64ObservableGauge("bucketlb.bucket.cooling_down",
		metric.WithDescription("1 while the bucket is in cooldown after repeated failures, else 0."))
	check(err)
	m.bucketState, err = mt.Int64ObservableGauge("bucketlb.bucket.state",
		metric.WithDescription("1 for the bucket's current admin state (active, draining, disabled), 0 for the others."))
	check(err)
	m.etcdUp, err = mt.Int64ObservableGauge("bucketlb.etcd.up",
		metric.WithDescription("1 when this allocator replica reaches etcd with quorum, else 0."))
	check(err)
	m.leader, err = mt.Int64ObservableGauge("bucketlb.allocator.leader",
		metric.WithDescription("1 on the allocator replica elected to run the periodic jobs, else 0."))
	check(err)

	if len(errs) > 0 {
		return nil, fmt.Errorf("telemetry: create instruments: %w", errors.Join(errs...))
	}
	return m, nil
}

// Upload describes one finished Upload call for RecordUpload.
type Upload struct {
	// Bucket is the id of the bucket that took the object; empty when
	// none did.
	Bucket string
	// Bytes received from the client.
	Bytes int64
	// Duration from the header to the response.
	Duration time.Duration
	// Replay is true when an earlier identical upload's result was returned.
	Replay bool
	// Err is the error returned to the client (a gRPC status), nil on success.
	Err error
	// CallerFault marks an Err that the caller brought about although its
	// code does not say so (a client cut off for sending nothing, or too
	// little, a second upload under a running upload's idempotency key):
	// it counts as rejected, so misbehaving clients do not page anyone
	// about the service's success rate.
	CallerFault bool
}

// RecordUpload counts a finished Upload call (upload service, once per
// call, where the status is returned).
func (m *Metrics) RecordUpload(ctx context.Context, u Upload) {
	if m == nil {
		return
	}
	outcome := Outcome(u.Err)
	switch {
	case outcome == OutcomeOK && u.Replay:
		outcome = OutcomeReplay
	case u.Err != nil && u.CallerFault:
		outcome = OutcomeRejected
	}
	byOutcome := metric.WithAttributeSet(attribute.NewSet(attribute.String("outcome", outcome)))
	m.uploads.Add(ctx, 1, byOutcome)
	m.uploadDuration.Record(ctx, u.Duration.Seconds(), byOutcome)
	if u.Bytes > 0 {
		m.uploadBytes.Add(ctx, u.Bytes, metric.WithAttributes(
			attribute.String("bucket", u.Bucket), attribute.String("outcome", outcome)))
	}
}

// TrackUploadStream counts an Upload stream in progress until the returned
// function is called (upload service: call it when the stream starts and
// defer the result).
func (m *Metrics) TrackUploadStream(ctx context.Context) (done func()) {
	if m == nil {
		return func() {}
	}
	m.uploadStreams.Add(ctx, 1)
	return func() { m.uploadStreams.Add(context.WithoutCancel(ctx), -1) }
}

// TrackUploadBuffer counts n bytes of upload buffers held until the
// returned function is called (upload service).
func (m *Metrics) TrackUploadBuffer(ctx context.Context, n int64) (done func()) {
	if m == nil {
		return func() {}
	}
	m.uploadBuffers.Add(ctx, n)
	return func() { m.uploadBuffers.Add(context.WithoutCancel(ctx), -n) }
}

// TrackBufferWait counts a call waiting for buffer room until the returned
// function is called (upload service).
func (m *Metrics) TrackBufferWait(ctx context.Context) (done func()) {
	if m == nil {
		return func() {}
	}
	m.bufferWaiting.Add(ctx, 1)
	return func() { m.bufferWaiting.Add(context.WithoutCancel(ctx), -1) }
}

// FailoverReason says why an upload left a bucket.
type FailoverReason string

const (
	// FailoverBucketFailed: the bucket failed the write.
	FailoverBucketFailed FailoverReason = "bucket_failed"
	// FailoverNoKeys: this replica has no keys for the bucket (its secret
	// is not mounted here); the bucket itself may be fine.
	FailoverNoKeys FailoverReason = "no_keys"
)

// RecordFailover counts an upload that left bucket for reason (upload
// service).
func (m *Metrics) RecordFailover(ctx context.Context, bucket string, reason FailoverReason) {
	if m == nil {
		return
	}
	m.failovers.Add(ctx, 1, metric.WithAttributes(attribute.String("bucket", bucket), attribute.String("reason", string(reason))))
}

// LeftoverKind says what an upload may have left in a bucket.
type LeftoverKind string

const (
	// LeftoverObject: an object whose usage is not counted.
	LeftoverObject LeftoverKind = "object"
	// LeftoverMultipart: an open multipart upload and its parts.
	LeftoverMultipart LeftoverKind = "multipart"
)

// RecordLeftover counts something a failed upload may have left in bucket
// because its removal failed or could not be attempted (upload service).
// The log line next to it names the key.
func (m *Metrics) RecordLeftover(ctx context.Context, bucket string, kind LeftoverKind) {
	if m == nil {
		return
	}
	attrs := attribute.NewSet(attribute.String("bucket", bucket), attribute.String("kind", string(kind)))
	m.leftovers.Add(context.WithoutCancel(ctx), 1, metric.WithAttributeSet(attrs))
	m.lastLeftover.note(attrs)
}

// lastEvents keeps when an event last happened, per attribute set, for a
// gauge of its Unix time.
type lastEvents struct {
	mu sync.Mutex
	at map[attribute.Set]time.Time
}

func (l *lastEvents) note(attrs attribute.Set) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.at == nil {
		l.at = map[attribute.Set]time.Time{}
	}
	l.at[attrs] = time.Now()
}

func (l *lastEvents) observe(_ context.Context, o metric.Float64Observer) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for attrs, at := range l.at {
		o.Observe(float64(at.UnixNano())/1e9, metric.WithAttributeSet(attrs))
	}
	return nil
}

// RecordCorruptRead counts a read of a whole object from bucket whose
// bytes did not hash to the object's stored sha256 (upload service).
func (m *Metrics) RecordCorruptRead(ctx context.Context, bucket string) {
	if m == nil {
		return
	}
	attrs := attribute.NewSet(attribute.String("bucket", bucket))
	m.corruptReads.Add(context.WithoutCancel(ctx), 1, metric.WithAttributeSet(attrs))
	m.lastCorrupt.note(attrs)
}

// RecordReservation counts an Allocate call: the bucket chosen (empty on
// error) and the error returned (allocator service).
func (m *Metrics) RecordReservation(ctx context.Context, bucket string, err error) {
	if m == nil {
		return
	}
	m.reservations.Add(ctx, 1, metric.WithAttributes(
		attribute.String("bucket", bucket), attribute.String("outcome", Outcome(err))))
}

// RecordCommit counts a Commit call; replay is true when the reservation
// was already committed (allocator service).
func (m *Metrics) RecordCommit(ctx context.Context, bucket string, replay bool, err error) {
	if m == nil {
		return
	}
	outcome := Outcome(err)
	if outcome == OutcomeOK && replay {
		outcome = OutcomeReplay
	}
	m.commits.Add(ctx, 1, metric.WithAttributes(
		attribute.String("bucket", bucket), attribute.String("outcome", outcome)))
}

// RecordPanic counts a handler panic recovered into INTERNAL; method is
// the gRPC full method name (every server).
func (m *Metrics) RecordPanic(ctx context.Context, method string) {
	if m == nil {
		return
	}
	m.panics.Add(ctx, 1, metric.WithAttributes(attribute.String("rpc.method", method)))
}
