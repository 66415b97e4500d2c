package telemetry_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

// recordAll records through every instrument once or more with known
// values; TestMetricsScrapedOverHTTP checks them and
// TestDeploymentsUseEmittedMetrics takes the emitted names from it.
func recordAll(t *testing.T, m *telemetry.Metrics) {
	t.Helper()
	ctx := context.Background()
	m.RecordUpload(ctx, telemetry.Upload{Bucket: "b1", Bytes: 1000, Duration: 20 * time.Millisecond})
	m.RecordUpload(ctx, telemetry.Upload{Bucket: "b1", Bytes: 500, Duration: 30 * time.Millisecond})
	m.RecordUpload(ctx, telemetry.Upload{Bucket: "b1", Bytes: 1000, Duration: time.Millisecond, Replay: true})
	m.RecordUpload(ctx, telemetry.Upload{Bytes: 10, Err: status.Error(codes.InvalidArgument, "bad key")})
	m.RecordUpload(ctx, telemetry.Upload{Bytes: 5, Err: status.Error(codes.DeadlineExceeded, "client idle"), CallerFault: true})
	m.RecordUpload(ctx, telemetry.Upload{Bucket: "b2", Bytes: 700, Duration: 2 * time.Second,
		Err: fmt.Errorf("upload: %w", status.Error(codes.Unavailable, "every bucket failed"))})
	done := m.TrackUploadStream(ctx)
	m.TrackUploadStream(ctx)()
	_ = done // still in progress at the scrape
	held := m.TrackUploadBuffer(ctx, 8<<20)
	m.TrackUploadBuffer(ctx, 1024)()
	_ = held
	waiting := m.TrackBufferWait(ctx)
	_ = waiting // still waiting at the scrape
	m.RecordFailover(ctx, "b2", telemetry.FailoverBucketFailed)
	m.RecordFailover(ctx, "b2", telemetry.FailoverNoKeys)
	m.RecordFailover(ctx, "b2", telemetry.FailoverNoKeys)
	m.RecordLeftover(ctx, "b2", telemetry.LeftoverObject)
	m.RecordLeftover(ctx, "b2", telemetry.LeftoverMultipart)
	m.RecordLeftover(ctx, "b2", telemetry.LeftoverMultipart)
	m.RecordCorruptRead(ctx, "b1")
	m.RecordReservation(ctx, "b1", nil)
	m.RecordReservation(ctx, "b1", nil)
	m.RecordReservation(ctx, "", status.Error(codes.ResourceExhausted, "no bucket has room"))
	m.RecordCommit(ctx, "b1", false, nil)
	m.RecordCommit(ctx, "b1", true, nil)
	m.RecordPanic(ctx, "/bucketlb.upload.v1.UploadService/Upload")
	if _, err := m.ObserveBuckets(func(context.Context) []telemetry.BucketStat {
		return []telemetry.BucketStat{
			{ID: "b1", State: telemetry.StateActive, UsedBytes: 9_500, ReservedBytes: 200, LimitBytes: 10_000, HealthScore: 97.5},
			{ID: "b2", State: telemetry.StateDraining, UsedBytes: 10, LimitBytes: 10_000, HealthScore: 20, ConsecutiveFailures: 4, CoolingDown: true},
		}
	}); err != nil {
		t.Fatalf("ObserveBuckets: %v", err)
	}
	if _, err := m.ObserveAllocator(func(context.Context) telemetry.AllocatorStat {
		return telemetry.AllocatorStat{EtcdReachable: true, Leading: false}
	}); err != nil {
		t.Fatalf("ObserveAllocator: %v", err)
	}
}

// TestMetricsScrapedOverHTTP records through every domain instrument and
// reads the values back from /metrics over real HTTP, under the
// Prometheus names doc.go promises.
func TestMetricsScrapedOverHTTP(t *testing.T) {
	t.Parallel()
	tel, base := start(t, telemetry.Options{ServiceName: "bucketlb-upload", Version: "v1.2.3"})
	recordAll(t, tel.Metrics())
	fams := scrape(t, base)

	type L = map[string]string
	wantValue(t, fams, "bucketlb_uploads_total", L{"outcome": "ok"}, 2)
	wantValue(t, fams, "bucketlb_uploads_total", L{"outcome": "replay"}, 1)
	wantValue(t, fams, "bucketlb_uploads_total", L{"outcome": "rejected"}, 2)
	wantValue(t, fams, "bucketlb_uploads_total", L{"outcome": "unavailable"}, 1)
	wantValue(t, fams, "bucketlb_upload_bytes_total", L{"bucket": "b1", "outcome": "ok"}, 1500)
	wantValue(t, fams, "bucketlb_upload_bytes_total", L{"bucket": "b1", "outcome": "replay"}, 1000)
	wantValue(t, fams, "bucketlb_upload_bytes_total", L{"bucket": "", "outcome": "rejected"}, 15)
	wantValue(t, fams, "bucketlb_upload_bytes_total", L{"bucket": "b2", "outcome": "unavailable"}, 700)
	wantValue(t, fams, "bucketlb_upload_active_streams", nil, 1)
	wantValue(t, fams, "bucketlb_upload_buffer_bytes", nil, 8<<20)
	wantValue(t, fams, "bucketlb_upload_failovers_total", L{"bucket": "b2", "reason": "bucket_failed"}, 1)
	wantValue(t, fams, "bucketlb_upload_failovers_total", L{"bucket": "b2", "reason": "no_keys"}, 2)
	wantValue(t, fams, "bucketlb_upload_leftovers_total", L{"bucket": "b2", "kind": "object"}, 1)
	wantValue(t, fams, "bucketlb_upload_leftovers_total", L{"bucket": "b2", "kind": "multipart"}, 2)
	wantValue(t, fams, "bucketlb_upload_corrupt_reads_total", L{"bucket": "b1"}, 1)
	wantValue(t, fams, "bucketlb_allocator_reservations_total", L{"bucket": "b1", "outcome": "ok"}, 2)
	wantValue(t, fams, "bucketlb_allocator_reservations_total", L{"bucket": "", "outcome": "exhausted"}, 1)
	wantValue(t, fams, "bucketlb_allocator_commits_total", L{"bucket": "b1", "outcome": "ok"}, 1)
	wantValue(t, fams, "bucketlb_allocator_commits_total", L{"bucket": "b1", "outcome": "replay"}, 1)
	wantValue(t, fams, "bucketlb_grpc_panics_total", L{"rpc_method": "/bucketlb.upload.v1.UploadService/Upload"}, 1)
	wantValue(t, fams, "bucketlb_bucket_used_bytes", L{"bucket": "b1"}, 9500)
	wantValue(t, fams, "bucketlb_bucket_reserved_bytes", L{"bucket": "b1"}, 200)
	wantValue(t, fams, "bucketlb_bucket_limit_bytes", L{"bucket": "b2"}, 10000)
	wantValue(t, fams, "bucketlb_bucket_health_score", L{"bucket": "b1"}, 97.5)
	wantValue(t, fams, "bucketlb_bucket_health_score", L{"bucket": "b2"}, 20)
	wantValue(t, fams, "bucketlb_bucket_consecutive_failures", L{"bucket": "b2"}, 4)
	wantValue(t, fams, "bucketlb_bucket_cooling_down", L{"bucket": "b2"}, 1)
	wantValue(t, fams, "bucketlb_bucket_cooling_down", L{"bucket": "b1"}, 0)
	wantValue(t, fams, "bucketlb_bucket_state", L{"bucket": "b2", "state": "draining"}, 1)
	wantValue(t, fams, "bucketlb_bucket_state", L{"bucket": "b2", "state": "active"}, 0)
	wantValue(t, fams, "bucketlb_etcd_up", nil, 1)
	wantValue(t, fams, "bucketlb_allocator_leader", nil, 0)
	wantValue(t, fams, "target_info", L{"service_name": "bucketlb-upload", "service_version": "v1.2.3"}, 1)

	h, err := find(fams, "bucketlb_upload_duration_seconds", map[string]string{"outcome": "ok"})
	if err != nil {
		t.Fatal(err)
	}
	if got := h.GetHistogram().GetSampleCount(); got != 2 {
		t.Errorf("bucketlb_upload_duration_seconds{outcome=ok} count = %d, want 2", got)
	}
	if got := h.GetHistogram().GetSampleSum(); got < 0.049 || got > 0.051 {
		t.Errorf("bucketlb_upload_duration_seconds{outcome=ok} sum = %v, want 0.05", got)
	}
	// The process's own collectors are in the same registry.
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total", "process_resident_memory_bytes"} {
		if _, ok := fams[name]; !ok {
			t.Errorf("no %s in /metrics", name)
		}
	}
	if got := fams["bucketlb_uploads_total"].GetType(); got != dto.MetricType_COUNTER {
		t.Errorf("bucketlb_uploads_total type = %v, want COUNTER", got)
	}
	if got := fams["bucketlb_bucket_used_bytes"].GetType(); got != dto.MetricType_GAUGE {
		t.Errorf("bucketlb_bucket_used_bytes type = %v, want GAUGE", got)
	}
}

// TestTwoInstancesDoNotShareState proves nothing is global: two
// Telemetry values in one process keep separate registries.
func TestTwoInstancesDoNotShareState(t *testing.T) {
	t.Parallel()
	a, baseA := start(t, telemetry.Options{ServiceName: "a"})
	_, baseB := start(t, telemetry.Options{ServiceName: "b"})
	a.Metrics().RecordFailover(context.Background(), "only-in-a", telemetry.FailoverBucketFailed)
	wantValue(t, scrape(t, baseA), "bucketlb_upload_failovers_total", map[string]string{"bucket": "only-in-a"}, 1)
	if _, ok := scrape(t, baseB)["bucketlb_upload_failovers_total"]; ok {
		t.Error("a failover recorded on one Telemetry shows up in the other's /metrics")
	}
}

// TestObserveBucketsFollowsTheCallback: a bucket missing from the
// callback's answer disappears from the next scrape, and Unregister stops
// the gauges.
func TestObserveBucketsFollowsTheCallback(t *testing.T) {
	t.Parallel()
	tel, base := start(t, telemetry.Options{})
	buckets := make(chan []telemetry.BucketStat, 1)
	buckets <- []telemetry.BucketStat{{ID: "b1", LimitBytes: 1}, {ID: "b2", LimitBytes: 2}}
	var last []telemetry.BucketStat
	reg, err := tel.Metrics().ObserveBuckets(func(context.Context) []telemetry.BucketStat {
		select {
		case last = <-buckets:
		default:
		}
		return last
	})
	if err != nil {
		t.Fatal(err)
	}
	wantValue(t, scrape(t, base), "bucketlb_bucket_limit_bytes", map[string]string{"bucket": "b2"}, 2)

	buckets <- []telemetry.BucketStat{{ID: "b1", LimitBytes: 5}}
	fams := scrape(t, base)
	wantValue(t, fams, "bucketlb_bucket_limit_bytes", map[string]string{"bucket": "b1"}, 5)
	if _, err := find(fams, "bucketlb_bucket_limit_bytes", map[string]string{"bucket": "b2"}); err == nil {
		t.Error("bucket b2 still published after the callback stopped reporting it")
	}

	if err := reg.Unregister(); err != nil {
		t.Fatal(err)
	}
	if _, ok := scrape(t, base)["bucketlb_bucket_limit_bytes"]; ok {
		t.Error("bucket gauges still published after Unregister")
	}
}

// TestHealthz: 200 while running, 503 once Shutdown began.
func TestHealthz(t *testing.T) {
	t.Parallel()
	tel, base := start(t, telemetry.Options{})
	if code, body := get(t, base+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Fatalf("GET /healthz = %d %q, want 200 \"ok\\n\"", code, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := tel.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(t, base+"/healthz"); code != http.StatusServiceUnavailable {
		t.Fatalf("GET /healthz after Shutdown = %d, want 503", code)
	}
}

// A service's metrics server outlives the signal that stops the service
// (StartService's ctx): a drain is scraped until Shutdown, which then
// stops the server.
func TestMetricsServedUntilShutdown(t *testing.T) {
	t.Parallel()
	sig, signalled := context.WithCancel(context.Background())
	tel, err := telemetry.StartService(sig, "svc", "v", "127.0.0.1:0", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + tel.MetricsAddr()
	signalled()
	// Nothing to poll for: the server must go on answering. A server
	// stopped by the signal refuses within moments.
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
		for _, path := range []string{"/metrics", "/healthz"} {
			if code, _ := get(t, base+path); code != http.StatusOK {
				t.Fatalf("GET %s after the signal = %d, want 200 until Shutdown", path, code)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tel.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := net.Dial("tcp", tel.MetricsAddr()); err == nil {
		t.Fatal("the metrics server still takes connections after Shutdown")
	}
}

// TestNilMetricsRecordsNothing: components may hold a nil *Metrics.
func TestNilMetricsRecordsNothing(t *testing.T) {
	t.Parallel()
	var m *telemetry.Metrics
	ctx := context.Background()
	m.RecordUpload(ctx, telemetry.Upload{Bytes: 1})
	m.TrackUploadStream(ctx)()
	m.RecordFailover(ctx, "b", telemetry.FailoverBucketFailed)
	m.RecordReservation(ctx, "b", nil)
	m.RecordCommit(ctx, "b", false, nil)
	m.RecordPanic(ctx, "/x/y")
	for _, reg := range []func() error{
		func() error {
			r, err := m.ObserveBuckets(func(context.Context) []telemetry.BucketStat { return nil })
			if err != nil {
				return err
			}
			return r.Unregister()
		},
		func() error {
			r, err := m.ObserveAllocator(func(context.Context) telemetry.AllocatorStat { return telemetry.AllocatorStat{} })
			if err != nil {
				return err
			}
			return r.Unregister()
		},
	} {
		if err := reg(); err != nil {
			t.Error(err)
		}
	}
}

func TestNewRequiresServiceName(t *testing.T) {
	t.Parallel()
	if _, err := telemetry.New(context.Background(), telemetry.Options{}); err == nil {
		t.Fatal("New without ServiceName succeeded")
	}
}

func TestOutcome(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"nil", nil, telemetry.OutcomeOK},
		{"invalid argument", status.Error(codes.InvalidArgument, "x"), telemetry.OutcomeRejected},
		{"failed precondition", status.Error(codes.FailedPrecondition, "x"), telemetry.OutcomeRejected},
		{"not found", status.Error(codes.NotFound, "x"), telemetry.OutcomeRejected},
		{"permission denied", status.Error(codes.PermissionDenied, "x"), telemetry.OutcomeRejected},
		{"unauthenticated", status.Error(codes.Unauthenticated, "x"), telemetry.OutcomeRejected},
		{"canceled status", status.Error(codes.Canceled, "x"), telemetry.OutcomeCanceled},
		{"context canceled", fmt.Errorf("upload: %w", context.Canceled), telemetry.OutcomeCanceled},
		{"resource exhausted", status.Error(codes.ResourceExhausted, "x"), telemetry.OutcomeExhausted},
		{"unavailable", status.Error(codes.Unavailable, "x"), telemetry.OutcomeUnavailable},
		{"deadline status", status.Error(codes.DeadlineExceeded, "x"), telemetry.OutcomeUnavailable},
		{"context deadline", context.DeadlineExceeded, telemetry.OutcomeUnavailable},
		{"wrapped unavailable", fmt.Errorf("a: %w", status.Error(codes.Unavailable, "x")), telemetry.OutcomeUnavailable},
		{"internal", status.Error(codes.Internal, "x"), telemetry.OutcomeFailed},
		{"plain error", errors.New("boom"), telemetry.OutcomeFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := telemetry.Outcome(tc.err); got != tc.want {
				t.Errorf("Outcome(%v) = %q, want %q", tc.err, got, tc.want)
			}
		})
	}
}

// A leftover and a corrupt read also set the time of the last one, per
// bucket (and kind): the alerts on these rare events read those gauges.
func TestLastEventTimes(t *testing.T) {
	t.Parallel()
	tel, base := start(t, telemetry.Options{})
	before := float64(time.Now().Unix())
	tel.Metrics().RecordCorruptRead(context.Background(), "b1")
	tel.Metrics().RecordLeftover(context.Background(), "b2", telemetry.LeftoverMultipart)
	after := float64(time.Now().Unix() + 1)
	fams := scrape(t, base)
	for name, labels := range map[string]map[string]string{
		"bucketlb_upload_last_corrupt_read_seconds": {"bucket": "b1"},
		"bucketlb_upload_last_leftover_seconds":     {"bucket": "b2", "kind": "multipart"},
	} {
		fam := fams[name]
		if fam == nil || len(fam.GetMetric()) != 1 {
			t.Fatalf("%s: %v, want one series", name, fam)
		}
		m := fam.GetMetric()[0]
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			if l.GetName() == "bucket" || l.GetName() == "kind" {
				got[l.GetName()] = l.GetValue()
			}
		}
		if v := m.GetGauge().GetValue(); v < before || v > after || !maps.Equal(got, labels) {
			t.Fatalf("%s%v = %v, want %v between %v and %v", name, got, v, labels, before, after)
		}
	}
}
