package allocator_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/etcdembed"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

// A replica publishes every bucket's usage, limit, health and state, and
// its own view of etcd and the election, from its caches: what the
// dashboard and the utilization, health and etcd alerts read. When etcd
// goes away, bucketlb_etcd_up drops to 0, and back to 1 when it returns.
func TestGaugesFollowTheReplicasView(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	srv, err := etcdembed.Start(ctx, etcdembed.Options{Dir: dir, LogLevel: "fatal"})
	if err != nil {
		t.Fatal(err)
	}
	stopEtcd := sync.OnceFunc(func() { srv.Close() })
	defer stopEtcd()
	tel, err := telemetry.New(ctx, telemetry.Options{ServiceName: "allocator-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tel.Shutdown(context.Background()) })
	r := startReplica(t, testenv.EtcdClient(t, srv.Endpoint), allocator.Config{
		Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1<<30), spec("p2", 2, 1<<20)}, Metrics: tel.Metrics()})

	a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 5000})
	if err != nil {
		t.Fatal(err)
	}
	commit := &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: 5000, Size: 4000}
	if _, err := r.alloc.Commit(ctx, commit); err != nil {
		t.Fatal(err)
	}
	if _, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p2", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Latency: durationpb.New(time.Millisecond), Error: "injected"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.SetBucketState(adminCtx(ctx, token), &adminv1.SetBucketStateRequest{Id: "p2", State: adminv1.BucketState_BUCKET_STATE_DRAINING}); err != nil {
		t.Fatal(err)
	}
	gauge := func(name string, labels map[string]string) float64 {
		v, _ := testenv.MetricValue(t, tel.Registry(), name, labels)
		return v
	}
	p1, p2 := map[string]string{"bucket": "p1"}, map[string]string{"bucket": "p2"}
	want := []struct {
		name   string
		labels map[string]string
		value  float64
	}{
		{"bucketlb_bucket_used_bytes", p1, 4000},
		{"bucketlb_bucket_used_bytes", p2, 0},
		{"bucketlb_bucket_limit_bytes", p1, 1 << 30},
		{"bucketlb_bucket_limit_bytes", p2, 1 << 20},
		{"bucketlb_bucket_consecutive_failures", p2, 1},
		{"bucketlb_bucket_health_score", p1, 100},
		{"bucketlb_bucket_state", map[string]string{"bucket": "p1", "state": "active"}, 1},
		{"bucketlb_bucket_state", map[string]string{"bucket": "p2", "state": "draining"}, 1},
		{"bucketlb_bucket_state", map[string]string{"bucket": "p2", "state": "active"}, 0},
		{"bucketlb_etcd_up", nil, 1},
		{"bucketlb_allocator_leader", nil, 1},
	}
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; i < len(want); {
		w := want[i]
		if got := gauge(w.name, w.labels); got != w.value {
			if time.Now().After(deadline) {
				t.Fatalf("%s%v = %v, want %v", w.name, w.labels, got, w.value)
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		i++
	}
	if s := gauge("bucketlb_bucket_health_score", p2); s >= 100 {
		t.Fatalf("health score of the failing bucket is %v, want below 100", s)
	}
	// The replica's view now counts the commit: a retry of it reports
	// that usage, without counting the commit a second time.
	if cr, err := r.alloc.Commit(ctx, commit); err != nil || !cr.GetAlreadyCommitted() || cr.GetUsedBytes() != 4000 {
		t.Fatalf("retried commit: %v %v, want already committed with 4000 bytes used", cr, err)
	}
	// An operator's correction of another bucket's usage leaves the
	// gauges as they were until the next read.
	if _, err := r.admin.CorrectUsage(adminCtx(ctx, token), &adminv1.CorrectUsageRequest{Id: "p2", UsedBytes: 10}); err != nil {
		t.Fatal(err)
	}
	if used, up := gauge("bucketlb_bucket_used_bytes", p1), gauge("bucketlb_etcd_up", nil); used != 4000 || up != 1 {
		t.Fatalf("right after CorrectUsage of p2: p1 used %v, etcd up %v; want 4000 and 1", used, up)
	}

	stopEtcd()
	for gauge("bucketlb_etcd_up", nil) != 0 {
		if time.Now().After(deadline.Add(10 * time.Second)) {
			t.Fatal("bucketlb_etcd_up stayed 1 with etcd gone")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// etcd back at the same address: the replica says so again.
	srv2, err := etcdembed.Start(ctx, etcdembed.Options{Dir: dir, ClientAddr: srv.Endpoint[len("http://"):], LogLevel: "fatal"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	for gauge("bucketlb_etcd_up", nil) != 1 {
		if time.Now().After(deadline.Add(30 * time.Second)) {
			t.Fatal("bucketlb_etcd_up stayed 0 after etcd came back")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Allocate and Commit are counted by the status their caller gets, which
// the BucketlbNoCapacity alert reads (outcome="exhausted"). They were
// counted by the domain error, which carries no code: every refusal was
// "failed", and the alert could never fire.
func TestCallsAreCountedByTheirStatus(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tel, err := telemetry.New(ctx, telemetry.Options{ServiceName: "allocator-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tel.Shutdown(context.Background()) })
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}, Metrics: tel.Metrics()})
	if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 2000}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("allocate over the limit: %v", err)
	}
	if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: -1}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("allocate of a negative size: %v", err)
	}
	// A reservation that vanished, for more bytes than the bucket has.
	if _, err := r.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: "gone", BucketId: "p1", ReservedBytes: 2000, Size: 2000}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("commit of a lost reservation that cannot be granted again: %v", err)
	}
	count := func(name, outcome string) float64 {
		v, _ := testenv.MetricValue(t, tel.Registry(), name, map[string]string{"outcome": outcome})
		return v
	}
	for _, c := range []struct {
		name, outcome string
		want          float64
	}{
		{"bucketlb_allocator_reservations_total", "exhausted", 1},
		{"bucketlb_allocator_reservations_total", "rejected", 1},
		{"bucketlb_allocator_reservations_total", "failed", 0},
		{"bucketlb_allocator_commits_total", "rejected", 1},
		{"bucketlb_allocator_commits_total", "failed", 0},
	} {
		if got := count(c.name, c.outcome); got != c.want {
			t.Errorf("%s{outcome=%q} = %v, want %v", c.name, c.outcome, got, c.want)
		}
	}
}
