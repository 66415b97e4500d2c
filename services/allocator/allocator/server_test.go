package allocator_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/auth"
	"github.com/bucketlb/bucketlb/pkg/errinfo"
	"github.com/bucketlb/bucketlb/pkg/etcdclient"
	"github.com/bucketlb/bucketlb/pkg/etcdembed"
	"github.com/bucketlb/bucketlb/pkg/grpcserver"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

const (
	token        = "test-admin-token"
	serviceToken = "test-service-token"
)

type replica struct {
	alloc allocatorv1.AllocatorServiceClient
	admin adminv1.AdminServiceClient
	addr  string
	// stop shuts the replica down (also done at cleanup).
	stop func()
}

func spec(id string, prio int32, limit int64) *adminv1.BucketSpec {
	return &adminv1.BucketSpec{Id: id, Name: id, Endpoint: "http://127.0.0.1:1", Region: "auto", CredentialsRef: "R",
		MonthlyLimitBytes: limit, Priority: prio, Weight: 1, State: adminv1.BucketState_BUCKET_STATE_ACTIVE}
}

// startReplica runs an allocator on its own etcd client and gRPC server.
func startReplica(t testing.TB, cli *clientv3.Client, cfg allocator.Config) replica {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cfg.AdminToken, cfg.ServiceToken = token, serviceToken
	log := slog.New(slog.DiscardHandler)
	a, err := allocator.New(ctx, cli, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	unary, stream := a.Interceptors()
	srv := grpcserver.New(grpcserver.Options{Logger: log, StopTimeout: time.Second,
		UnaryInterceptors: []grpc.UnaryServerInterceptor{unary}, StreamInterceptors: []grpc.StreamServerInterceptor{stream}})
	a.Register(srv.GRPC)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{}, 2)
	go func() { _ = a.Run(ctx); done <- struct{}{} }()
	go func() { _ = srv.Serve(ctx, lis); done <- struct{}{} }()
	// As in production: the upload service's connection sends the service
	// token on every call, an operator's call carries the admin token.
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(auth.Credentials(serviceToken)))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	aconn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	stop := sync.OnceFunc(func() {
		conn.Close()
		aconn.Close()
		cancel()
		<-done
		<-done
		_ = a.Close()
	})
	t.Cleanup(stop)
	return replica{alloc: allocatorv1.NewAllocatorServiceClient(conn), admin: adminv1.NewAdminServiceClient(aconn), addr: lis.Addr().String(), stop: stop}
}

func adminCtx(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

func used(t *testing.T, r replica, id string) (int64, int64) {
	t.Helper()
	b := bucketStatus(t, r, id)
	return b.GetUsedBytes(), b.GetReservedBytes()
}

func failures(t *testing.T, r replica, id string) int32 {
	t.Helper()
	return bucketStatus(t, r, id).GetConsecutiveFailures()
}

// bucketStatus returns bucket id's row of the admin status.
func bucketStatus(t *testing.T, r replica, id string) *adminv1.BucketStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := r.admin.GetStatus(adminCtx(ctx, token), &adminv1.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range st.GetBuckets() {
		if b.GetBucket().GetId() == id {
			return b
		}
	}
	t.Fatalf("bucket %s not in status", id)
	return nil
}

func TestAllocateCommitRelease(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000), spec("p2", 2, 5000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	a1, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 800})
	if err != nil {
		t.Fatal(err)
	}
	if a1.GetBucket().GetId() != "p1" {
		t.Fatalf("priority-first chose %s, want p1", a1.GetBucket().GetId())
	}
	// p1 has only 200 left: the next 800 go to p2.
	a2, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 800})
	if err != nil || a2.GetBucket().GetId() != "p2" {
		t.Fatalf("second allocation: %v %v, want p2", a2.GetBucket().GetId(), err)
	}
	c := &allocatorv1.CommitRequest{ReservationId: a1.GetReservationId(), BucketId: "p1", ReservedBytes: 800, Size: 700}
	cr, err := r.alloc.Commit(ctx, c)
	if err != nil || cr.GetAlreadyCommitted() || cr.GetUsedBytes() != 700 {
		t.Fatalf("commit: %v %v", cr, err)
	}
	cr2, err := r.alloc.Commit(ctx, c)
	if err != nil || !cr2.GetAlreadyCommitted() || cr2.GetUsedBytes() != 700 {
		t.Fatalf("retried commit: %v %v, want the same answer flagged", cr2, err)
	}
	if _, err := r.alloc.Release(ctx, &allocatorv1.ReleaseRequest{ReservationId: a2.GetReservationId(), BucketId: "p2"}); err != nil {
		t.Fatal(err)
	}
	if u, _ := used(t, r, "p1"); u != 700 {
		t.Fatalf("p1 used %d, want 700", u)
	}
	if u, _ := used(t, r, "p2"); u != 0 {
		t.Fatalf("p2 used %d after release, want 0", u)
	}
	// Capacity the replica still holds in blocks goes back once it idles.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, r1 := used(t, r, "p1")
		_, r2 := used(t, r, "p2")
		if r1 == 0 && r2 == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("blocks still hold %d and %d bytes", r1, r2)
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 6000})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("oversized allocation: %v, want ResourceExhausted", err)
	}
	_, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 0})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("zero-size allocation: %v, want InvalidArgument", err)
	}
	// Excluding p1 and p2 leaves no bucket.
	_, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1, ExcludeBucketIds: []string{"p1", "p2"}})
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "(of 2 buckets: 2 already tried by this upload)") {
		t.Fatalf("all excluded: %v, want Unavailable saying why", err)
	}
}

// replicaAtMonthEnd runs a replica with one 1000-byte bucket, p1, on a
// clock set just before January's last two minutes (in the last one,
// commits count in February: see the ledger's turnMargin); set now to
// move it.
func replicaAtMonthEnd(t *testing.T) (replica, *atomic.Int64) {
	_, cli := testenv.Etcd(t)
	now := &atomic.Int64{}
	now.Store(time.Date(2026, 1, 31, 23, 57, 58, 0, time.UTC).UnixNano())
	r := startReplica(t, cli, allocator.Config{Now: func() time.Time { return time.Unix(0, now.Load()).UTC() },
		Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	return r, now
}

// A full bucket takes uploads again as soon as the period turns or an
// operator resets its usage: the allocator does not answer from its
// estimate of usage that "no room is left this period" (an answer clients
// do not retry) once that estimate is of another period, or older than
// the reset.
func TestRoomComesBackAtOnce(t *testing.T) {
	r, now := replicaAtMonthEnd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	fill := func() {
		t.Helper()
		a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: 1000, Size: 1000}); err != nil {
			t.Fatal(err)
		}
		// Until the allocator's estimate of usage has the commit: then it
		// answers that committed bytes leave no room this period.
		for {
			_, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 500})
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("allocate in a full bucket: %v, want ResourceExhausted", err)
			}
			if strings.Contains(status.Convert(err).Message(), "committed bytes leave less than that") {
				return
			}
			select {
			case <-ctx.Done():
				t.Fatal("the estimate of usage never had the commit")
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	fill()
	now.Store(time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 500})
	if err != nil {
		t.Fatalf("allocate as the period turned: %v, want room", err)
	}
	if _, err := r.alloc.Release(ctx, &allocatorv1.ReleaseRequest{ReservationId: a.GetReservationId(), BucketId: "p1"}); err != nil {
		t.Fatal(err)
	}
	fill()
	if _, err := r.admin.ResetUsage(adminCtx(ctx, token), &adminv1.ResetUsageRequest{Id: "p1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 500}); err != nil {
		t.Fatalf("allocate after ResetUsage: %v, want room", err)
	}
}

// In a period's last minute the allocator already counts in the next
// period (the ledger turns a minute early, for replicas whose clocks
// differ), and says so everywhere: status, refusals and resets are of the
// period its commits count in.
func TestTheLastMinuteIsTheNextPeriods(t *testing.T) {
	r, now := replicaAtMonthEnd(t)
	now.Store(time.Date(2026, 1, 31, 23, 59, 10, 0, time.UTC).UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1000})
	if err != nil {
		t.Fatal(err)
	}
	cr, err := r.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: 1000, Size: 1000})
	if err != nil || cr.GetPeriod() != "2026-02" || cr.GetUsedBytes() != 1000 {
		t.Fatalf("commit at 23:59:10 on January 31: %v %v, want it counted in 2026-02", cr, err)
	}
	st, err := r.admin.GetStatus(adminCtx(ctx, token), &adminv1.GetStatusRequest{})
	if err != nil || st.GetPeriod() != "2026-02" || st.GetBuckets()[0].GetUsedBytes() != 1000 {
		t.Fatalf("status in January's last minute: %v %v, want 2026-02 with 1000 bytes used", st, err)
	}
	// Refused as full for the period (no retry helps), not as held by
	// reservations.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		_, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 500})
		if strings.Contains(status.Convert(err).Message(), "committed bytes leave less than that") || time.Now().After(deadline) {
			break
		}
	}
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), "committed bytes leave less than that") {
		t.Fatalf("allocate in a bucket full for the period: %v, want it told committed bytes leave no room", err)
	}
	if rs, err := r.admin.ResetUsage(adminCtx(ctx, token), &adminv1.ResetUsageRequest{Id: "p1"}); err != nil || rs.GetPreviousUsedBytes() != 1000 {
		t.Fatalf("ResetUsage in January's last minute: %v %v, want February's 1000 bytes reset", rs, err)
	}
}

// An upload that committed bytes leave no room for is told so at once,
// without RetryInfo, however recent the commits that took the room: a
// RetryInfo would have clients wait and retry for nothing. Sizes near the
// int64 limit do not overflow into "room".
func TestNoRoomLeftIsToldAtOnce(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 100)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 80})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: 80, Size: 80}); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int64{80, math.MaxInt64} {
		_, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: size})
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), "committed bytes leave less than that") || len(status.Convert(err).Details()) != 0 {
			t.Fatalf("allocate %d bytes where 20 are left: %v %v, want RESOURCE_EXHAUSTED saying committed bytes leave no room, without RetryInfo", size, err, status.Convert(err).Details())
		}
	}
}

// A commit retried after the period turned answers with the period its
// bytes were counted in and that period's usage, not the new period's.
func TestRetriedCommitAfterThePeriodTurned(t *testing.T) {
	r, now := replicaAtMonthEnd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	commit := func(size int64) (*allocatorv1.CommitRequest, *allocatorv1.CommitResponse) {
		t.Helper()
		a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: size})
		if err != nil {
			t.Fatal(err)
		}
		req := &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: size, Size: size}
		resp, err := r.alloc.Commit(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return req, resp
	}
	jan, first := commit(300)
	if first.GetPeriod() != "2026-01" || first.GetUsedBytes() != 300 {
		t.Fatalf("January's commit answered %v, want period 2026-01 with 300 bytes used", first)
	}
	now.Store(time.Date(2026, 2, 1, 0, 0, 1, 0, time.UTC).UnixNano())
	if _, feb := commit(100); feb.GetPeriod() != "2026-02" || feb.GetUsedBytes() != 100 {
		t.Fatalf("February's commit answered %v, want period 2026-02 with 100 bytes used", feb)
	}
	again, err := r.alloc.Commit(ctx, jan)
	if err != nil {
		t.Fatal(err)
	}
	if !again.GetAlreadyCommitted() || again.GetPeriod() != "2026-01" || again.GetUsedBytes() != 300 {
		t.Fatalf("January's commit retried in February answered %v, want already committed in 2026-01 with 300 bytes used", again)
	}
}

// With no bucket to take an upload, the error says why, bucket by bucket,
// so an operator knows whether to wait (cooldown) or act (states).
func TestNoBucketSaysWhy(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000), spec("p2", 2, 1000), spec("p3", 3, 1000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := 0; i < 3; i++ {
		if _, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Latency: durationpb.New(time.Millisecond)}); err != nil {
			t.Fatal(err)
		}
	}
	for id, state := range map[string]adminv1.BucketState{"p2": adminv1.BucketState_BUCKET_STATE_DRAINING, "p3": adminv1.BucketState_BUCKET_STATE_DISABLED} {
		if _, err := r.admin.SetBucketState(adminCtx(ctx, token), &adminv1.SetBucketStateRequest{Id: id, State: state}); err != nil {
			t.Fatal(err)
		}
	}
	const want = "(of 3 buckets: 1 cooling down, 1 draining, 1 disabled)"
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		_, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
		if strings.Contains(status.Convert(err).Message(), want) || time.Now().After(deadline) {
			break
		}
	}
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), want) {
		t.Fatalf("allocate with no bucket to take it: %v, want Unavailable ending %q", err, want)
	}
	// Every bucket taken out of service by an operator: no retry helps
	// until one acts, so no RetryInfo, and no room is what the caller
	// meets (not a passing outage).
	if _, err := r.admin.SetBucketState(adminCtx(ctx, token), &adminv1.SetBucketStateRequest{Id: "p1", State: adminv1.BucketState_BUCKET_STATE_DRAINING}); err != nil {
		t.Fatal(err)
	}
	const outOfService = "no bucket is in service to take uploads (of 3 buckets: 2 draining, 1 disabled); an operator must set a bucket ACTIVE or add one"
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		_, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
		if status.Convert(err).Message() == outOfService || time.Now().After(deadline) {
			break
		}
	}
	if status.Code(err) != codes.ResourceExhausted || status.Convert(err).Message() != outOfService || len(status.Convert(err).Details()) != 0 {
		t.Fatalf("allocate with every bucket out of service: %v %v, want ResourceExhausted %q without RetryInfo", err, status.Convert(err).Details(), outOfService)
	}
}

// bothAtOnce runs two admin calls at once, fails the test if either
// fails, and returns bucket id as stored after both.
func bothAtOnce(ctx context.Context, t *testing.T, r replica, id string, a, b func() error) *adminv1.BucketSpec {
	t.Helper()
	var wg sync.WaitGroup
	var errA, errB error
	wg.Go(func() { errA = a() })
	wg.Go(func() { errB = b() })
	wg.Wait()
	if errA != nil || errB != nil {
		t.Fatalf("calls at once: %v, %v", errA, errB)
	}
	got, err := r.admin.GetBucket(ctx, &adminv1.GetBucketRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	return got.GetBucket()
}

// A spec put without a state keeps the state the bucket has when the put
// applies: an operator's DISABLED set at the same moment, on another
// replica, is never undone by it. Either order of the two calls ends
// DISABLED, so both answering OK must too.
func TestStatelessPutKeepsAConcurrentState(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	other := startReplica(t, cli, allocator.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	actx := adminCtx(ctx, token)
	for round := range 100 {
		if _, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p1", State: adminv1.BucketState_BUCKET_STATE_ACTIVE}); err != nil {
			t.Fatal(err)
		}
		edit := spec("p1", int32(round%5), 1000)
		edit.State = adminv1.BucketState_BUCKET_STATE_UNSPECIFIED
		got := bothAtOnce(actx, t, r, "p1", func() error {
			_, err := other.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p1", State: adminv1.BucketState_BUCKET_STATE_DISABLED})
			return err
		}, func() error {
			_, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: edit})
			return err
		})
		if got.GetState() != adminv1.BucketState_BUCKET_STATE_DISABLED || got.GetPriority() != int32(round%5) {
			t.Fatalf("round %d: both calls answered OK and the bucket is %v with priority %d, want DISABLED with the put's priority %d",
				round, got.GetState(), got.GetPriority(), round%5)
		}
	}
}

// A put with an update mask changes only the named fields, on the bucket
// as it is when the put applies: two operators changing different fields
// at the same moment both see their change kept.
func TestMaskedPutsKeepEachOther(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	other := startReplica(t, cli, allocator.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	actx := adminCtx(ctx, token)
	mask := func(paths ...string) *fieldmaskpb.FieldMask { return &fieldmaskpb.FieldMask{Paths: paths} }
	for round := range 50 {
		got := bothAtOnce(actx, t, r, "p1", func() error {
			_, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1", Priority: int32(round)}, UpdateMask: mask("priority")})
			return err
		}, func() error {
			_, err := other.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1", Weight: int32(round + 1)}, UpdateMask: mask("weight")})
			return err
		})
		want := spec("p1", int32(round), 1000)
		want.Weight = int32(round + 1)
		if !proto.Equal(got, want) {
			t.Fatalf("round %d: after two masked puts the bucket is %v, want %v", round, got, want)
		}
	}
	for name, tc := range map[string]struct {
		req  *adminv1.PutBucketRequest
		want codes.Code
	}{
		"a path that is no field":    {&adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1"}, UpdateMask: mask("colour")}, codes.InvalidArgument},
		"the id":                     {&adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1"}, UpdateMask: mask("id")}, codes.InvalidArgument},
		"a bucket that is not there": {&adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p7", Weight: 2}, UpdateMask: mask("weight")}, codes.NotFound},
		"a change that is invalid":   {&adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1", Endpoint: "ftp://x"}, UpdateMask: mask("endpoint")}, codes.InvalidArgument},
	} {
		if _, err := r.admin.PutBucket(actx, tc.req); status.Code(err) != tc.want {
			t.Fatalf("masked put of %s: %v, want %v", name, err, tc.want)
		}
	}
	// An endpoint derived from the account follows a new account; one set
	// by hand stays.
	r2 := &adminv1.BucketSpec{Id: "r2", Name: "r2", AccountId: "0123456789abcdef0123456789abcdef", Region: "auto", CredentialsRef: "R", MonthlyLimitBytes: 1000, Weight: 1}
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: r2}); err != nil {
		t.Fatal(err)
	}
	moved, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "r2", AccountId: "fedcba9876543210fedcba9876543210"}, UpdateMask: mask("account_id")})
	if err != nil || moved.GetBucket().GetEndpoint() != "https://fedcba9876543210fedcba9876543210.r2.cloudflarestorage.com" {
		t.Fatalf("masked put of a new account: %v %v, want the new account's endpoint", moved.GetBucket(), err)
	}
	// The same URL written by hand in another form is still the account's.
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "r2", Endpoint: "https://FEDCBA9876543210fedcba9876543210.r2.cloudflarestorage.com/"}, UpdateMask: mask("endpoint")}); err != nil {
		t.Fatal(err)
	}
	moved, err = r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "r2", AccountId: "00000000000000000000000000000000"}, UpdateMask: mask("account_id")})
	if err != nil || moved.GetBucket().GetEndpoint() != "https://00000000000000000000000000000000.r2.cloudflarestorage.com" {
		t.Fatalf("masked put of a new account beside its old endpoint written in another form: %v %v, want the new account's endpoint", moved.GetBucket(), err)
	}
	// An EU bucket's endpoint keeps its jurisdiction.
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "r2", Endpoint: "https://00000000000000000000000000000000.eu.r2.cloudflarestorage.com"}, UpdateMask: mask("endpoint")}); err != nil {
		t.Fatal(err)
	}
	moved, err = r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "r2", AccountId: "fedcba9876543210fedcba9876543210"}, UpdateMask: mask("account_id")})
	if err != nil || moved.GetBucket().GetEndpoint() != "https://fedcba9876543210fedcba9876543210.eu.r2.cloudflarestorage.com" {
		t.Fatalf("masked put of a new account beside an EU endpoint: %v %v, want the new account's EU endpoint", moved.GetBucket(), err)
	}
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "r2", Endpoint: "https://s3.example.com"}, UpdateMask: mask("endpoint")}); err != nil {
		t.Fatal(err)
	}
	kept, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "r2", AccountId: "0123456789abcdef0123456789abcdef"}, UpdateMask: mask("account_id")})
	if err != nil || kept.GetBucket().GetEndpoint() != "https://s3.example.com" {
		t.Fatalf("masked put of an account beside an endpoint set by hand: %v %v, want that endpoint kept", kept.GetBucket(), err)
	}
	// An UNSPECIFIED state in the mask keeps the bucket's.
	if _, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p1", State: adminv1.BucketState_BUCKET_STATE_DRAINING}); err != nil {
		t.Fatal(err)
	}
	got, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1", MonthlyLimitBytes: 2000}, UpdateMask: mask("monthly_limit_bytes", "state")})
	if err != nil || got.GetBucket().GetState() != adminv1.BucketState_BUCKET_STATE_DRAINING || got.GetBucket().GetMonthlyLimitBytes() != 2000 {
		t.Fatalf("masked put of the limit and an unspecified state: %v %v, want DRAINING with the new limit", got.GetBucket(), err)
	}
}

// The data API takes the service token only: without a token, with a
// wrong one, or with the admin token (which upload pods must not need),
// a call is refused before it can reserve, report or read anything.
func TestDataCallsNeedTheServiceToken(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	bare := allocatorv1.NewAllocatorServiceClient(conn)
	for _, tc := range []struct {
		name string
		ctx  context.Context
		want codes.Code
	}{
		{"no token", ctx, codes.Unauthenticated},
		{"wrong token", adminCtx(ctx, "wrong"), codes.PermissionDenied},
		{"the admin token", adminCtx(ctx, token), codes.PermissionDenied},
	} {
		if _, err := bare.Allocate(tc.ctx, &allocatorv1.AllocateRequest{Size: 10}); status.Code(err) != tc.want {
			t.Fatalf("Allocate with %s: %v, want %v", tc.name, err, tc.want)
		}
		_, err := bare.ReportOutcome(tc.ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR})
		if status.Code(err) != tc.want {
			t.Fatalf("ReportOutcome with %s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if used, reserved := used(t, r, "p1"); used != 0 || reserved != 0 {
		t.Fatalf("after refused calls: used %d reserved %d, want nothing", used, reserved)
	}
	if f := failures(t, r, "p1"); f != 0 {
		t.Fatalf("after refused reports: %d failures, want 0", f)
	}
	if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10}); err != nil {
		t.Fatalf("Allocate with the service token: %v", err)
	}
}

// A replica refuses to start without a service token, or with the admin
// token as its service token.
func TestServiceTokenRequired(t *testing.T) {
	_, cli := testenv.Etcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, tok := range []string{"", token, "rotated-service-token " + token} {
		if _, err := allocator.New(ctx, cli, allocator.Config{AdminToken: token, ServiceToken: tok}, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "service token") {
			t.Fatalf("service token %q: %v, want a refusal naming the service token", tok, err)
		}
	}
}

func TestAdminAuthAndVerbs(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	other := startReplica(t, cli, allocator.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := r.admin.GetStatus(ctx, &adminv1.GetStatusRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("no token: %v, want Unauthenticated", err)
	}
	if _, err := r.admin.GetStatus(adminCtx(ctx, "wrong"), &adminv1.GetStatusRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("wrong token: %v, want PermissionDenied", err)
	}
	actx := adminCtx(ctx, token)
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "Bad Id"}}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("invalid spec: %v, want InvalidArgument", err)
	}
	// Specs no bucket could work with are refused when put, not found out
	// at the first upload; states outside the enum are refused too. The
	// refusal names the field as the API does.
	for name, c := range map[string]struct {
		edit  func(*adminv1.BucketSpec)
		field string
	}{
		"S3 name with spaces":       {func(b *adminv1.BucketSpec) { b.Name = "Bad Name!!" }, "name"},
		"endpoint not http(s)":      {func(b *adminv1.BucketSpec) { b.Endpoint = "ftp://x" }, "endpoint"},
		"endpoint not a URL":        {func(b *adminv1.BucketSpec) { b.Endpoint = "not a url" }, "endpoint"},
		"credentials ref with path": {func(b *adminv1.BucketSpec) { b.CredentialsRef = "../../etc" }, "credentials_ref"},
		"state outside the enum":    {func(b *adminv1.BucketSpec) { b.State = 42 }, "state"},
		"limit over 64 PiB":         {func(b *adminv1.BucketSpec) { b.MonthlyLimitBytes = 1 << 60 }, "monthly_limit_bytes"},
		"account id with a slash":   {func(b *adminv1.BucketSpec) { b.AccountId = "x/y" }, "account_id"},
	} {
		b := spec("px", 0, 1000)
		c.edit(b)
		_, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: b})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "bucket."+c.field+": ") {
			t.Fatalf("PutBucket with %s: %v, want InvalidArgument naming bucket.%s", name, err, c.field)
		}
	}
	if _, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p1", State: 99}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("SetBucketState 99: %v, want InvalidArgument", err)
	}
	if _, err := r.admin.CorrectUsage(actx, &adminv1.CorrectUsageRequest{Id: "p1", UsedBytes: 1 << 62}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("CorrectUsage to 2^62 bytes: %v, want InvalidArgument", err)
	}
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: spec("p0", 0, 1000)}); err != nil {
		t.Fatal(err)
	}
	// The other replica picks the new bucket up through its watch.
	deadline := time.Now().Add(time.Second)
	for {
		a, err := other.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10})
		if err == nil && a.GetBucket().GetId() == "p0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bucket added through admin not used by another replica within 1s (got %v, %v)", a.GetBucket().GetId(), err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p0", State: adminv1.BucketState_BUCKET_STATE_DRAINING}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(time.Second)
	for {
		a, err := other.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10})
		if err == nil && a.GetBucket().GetId() == "p1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("draining bucket still takes uploads on another replica after 1s (%v, %v)", a.GetBucket().GetId(), err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A spec put again without a state (to change an endpoint, say) keeps
	// the operator's DRAINING; a new bucket without one is ACTIVE.
	again := spec("p0", 0, 1000)
	again.Endpoint, again.State = "http://127.0.0.1:1", adminv1.BucketState_BUCKET_STATE_UNSPECIFIED
	if got, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: again}); err != nil || got.GetBucket().GetState() != adminv1.BucketState_BUCKET_STATE_DRAINING {
		t.Fatalf("spec put again without a state: %v %v, want it DRAINING still", got.GetBucket().GetState(), err)
	}
	fresh := spec("p9", 0, 1000)
	fresh.State = adminv1.BucketState_BUCKET_STATE_UNSPECIFIED
	if got, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: fresh}); err != nil || got.GetBucket().GetState() != adminv1.BucketState_BUCKET_STATE_ACTIVE {
		t.Fatalf("new bucket without a state: %v %v, want ACTIVE", got.GetBucket().GetState(), err)
	}
	if _, err := r.admin.DeleteBucket(actx, &adminv1.DeleteBucketRequest{Id: "p9"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.CorrectUsage(actx, &adminv1.CorrectUsageRequest{Id: "p1", UsedBytes: 123}); err != nil {
		t.Fatal(err)
	}
	if u, _ := used(t, r, "p1"); u != 123 {
		t.Fatalf("usage after correction = %d", u)
	}
	if prev, err := r.admin.ResetUsage(actx, &adminv1.ResetUsageRequest{Id: "p1"}); err != nil || prev.GetPreviousUsedBytes() != 123 {
		t.Fatalf("reset: %v %v", prev, err)
	}
	if _, err := r.admin.GetBucket(actx, &adminv1.GetBucketRequest{Id: "nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown bucket: %v, want NotFound", err)
	}
	// An id no bucket can have is the request's fault, not an unknown
	// bucket, on every call that names one.
	for _, id := range []string{"", "Bad Id!"} {
		for name, call := range map[string]func() error{
			"GetBucket":    func() error { _, err := r.admin.GetBucket(actx, &adminv1.GetBucketRequest{Id: id}); return err },
			"DeleteBucket": func() error { _, err := r.admin.DeleteBucket(actx, &adminv1.DeleteBucketRequest{Id: id}); return err },
			"ResetHealth":  func() error { _, err := r.admin.ResetHealth(actx, &adminv1.ResetHealthRequest{Id: id}); return err },
			"ResetUsage":   func() error { _, err := r.admin.ResetUsage(actx, &adminv1.ResetUsageRequest{Id: id}); return err },
			"CorrectUsage": func() error { _, err := r.admin.CorrectUsage(actx, &adminv1.CorrectUsageRequest{Id: id}); return err },
			"SetBucketState": func() error {
				_, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: id, State: adminv1.BucketState_BUCKET_STATE_DRAINING})
				return err
			},
			"a masked PutBucket": func() error {
				_, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: id, Weight: 2}, UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"weight"}}})
				return err
			},
		} {
			if err := call(); status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "must be 1–63 characters") {
				t.Fatalf("%s with id %q: %v, want INVALID_ARGUMENT naming what an id must be", name, id, err)
			}
		}
	}
	if _, err := r.admin.DeleteBucket(actx, &adminv1.DeleteBucketRequest{Id: "p0"}); err != nil {
		t.Fatal(err)
	}
	list, err := r.admin.ListBuckets(actx, &adminv1.ListBucketsRequest{})
	if err != nil || len(list.GetBuckets()) != 1 {
		t.Fatalf("list after delete: %v %v", list, err)
	}
}

// While a half-open bucket's one trial upload is out, other uploads are
// told to retry shortly (UNAVAILABLE, saying why), not that capacity ran
// out: the trial decides within moments whether the bucket takes them.
func TestTrialUnderWayIsNotNoRoom(t *testing.T) {
	_, cli := testenv.Etcd(t)
	var now atomic.Int64
	now.Store(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).UnixNano())
	r := startReplica(t, cli, allocator.Config{Now: func() time.Time { return time.Unix(0, now.Load()).UTC() },
		Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1<<30)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for range 3 {
		if _, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Latency: durationpb.New(time.Millisecond)}); err != nil {
			t.Fatal(err)
		}
	}
	now.Add(int64(16 * time.Minute)) // past the cooldown: half-open
	if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1}); err != nil {
		t.Fatalf("the trial upload: %v", err)
	}
	_, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "1 half-open with its one trial upload under way") {
		t.Fatalf("allocate while the trial is out: %v, want Unavailable saying a trial is under way", err)
	}
}

// A half-open bucket's trial whose reservation is released unused (the
// upload never wrote) goes back at once, on whichever replica the Release
// reaches, instead of keeping every upload off the bucket for the trial
// timeout; releasing another reservation leaves the trial out.
func TestReleasedTrialIsGivenBack(t *testing.T) {
	_, cli := testenv.Etcd(t)
	var now atomic.Int64
	now.Store(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()).UTC() }
	r1 := startReplica(t, cli, allocator.Config{Now: clock, Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1<<30)}})
	r2 := startReplica(t, cli, allocator.Config{Now: clock})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	early, err := r1.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1}) // before the cooldown
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := r1.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Latency: durationpb.New(time.Millisecond)}); err != nil {
			t.Fatal(err)
		}
	}
	now.Add(int64(16 * time.Minute)) // half-open
	trial, err := r1.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
	if err != nil {
		t.Fatalf("the trial upload: %v", err)
	}
	// r2 learns of the failures through its watch of the health records
	// (a replica whose cache lags takes the bucket for healthy: known).
	for deadline := time.Now().Add(10 * time.Second); failures(t, r2, "p1") < 3; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("r2 did not see the bucket's failures")
		}
	}
	if _, err := r2.alloc.Release(ctx, &allocatorv1.ReleaseRequest{ReservationId: early.GetReservationId(), BucketId: "p1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r2.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1}); status.Code(err) != codes.Unavailable {
		t.Fatalf("allocate after another reservation was released: %v, want Unavailable (the trial is still out)", err)
	}
	if _, err := r2.alloc.Release(ctx, &allocatorv1.ReleaseRequest{ReservationId: trial.GetReservationId(), BucketId: "p1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r2.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1}); err != nil {
		t.Fatalf("allocate after the trial's reservation was released: %v, want the next trial", err)
	}
}

// A bucket deleted while cooling down and added again under its id (say,
// pointed at another S3 bucket) starts healthy: its health went with it.
func TestDeletedBucketTakesItsHealthAlong(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1<<30)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for range 3 {
		if _, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Latency: durationpb.New(time.Millisecond)}); err != nil {
			t.Fatal(err)
		}
	}
	actx := adminCtx(ctx, token)
	if _, err := r.admin.DeleteBucket(actx, &adminv1.DeleteBucketRequest{Id: "p1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: spec("p1", 1, 1<<30)}); err != nil {
		t.Fatal(err)
	}
	poll := time.Now().Add(5 * time.Second) // the replica learns of the new bucket through its watch
	for {
		_, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
		if err == nil {
			break
		}
		if strings.Contains(status.Convert(err).Message(), "cooling down") || time.Now().After(poll) {
			t.Fatalf("allocate in the bucket added again: %v, want it healthy", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A report names a known bucket and a defined outcome: health records are
// kept for configured buckets only, never under an id a caller made up.
func TestReportOutcomeChecksItsInput(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, id := range []string{"nope", "../../buckets/evil"} {
		if _, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: id, Outcome: allocatorv1.Outcome_OUTCOME_ERROR}); status.Code(err) != codes.NotFound {
			t.Fatalf("report for bucket %q: %v, want NotFound", id, err)
		}
	}
	if _, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: 99}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("report with outcome 99: %v, want InvalidArgument", err)
	}
	if _, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Error: strings.Repeat("e", 100_000)}); err != nil {
		t.Fatalf("report with a long error text: %v", err)
	}
	keys, err := cli.Get(ctx, "/bucketlb/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range keys.Kvs {
		if k := string(kv.Key); strings.Contains(k, "nope") || strings.Contains(k, "evil") {
			t.Fatalf("a report for an unknown bucket left key %s", k)
		}
	}
}

// Three failures cool a bucket down on every replica; traffic moves on.
func TestReportedFailuresCoolDownEverywhere(t *testing.T) {
	_, cli := testenv.Etcd(t)
	buckets := []*adminv1.BucketSpec{spec("p1", 1, 1000), spec("p2", 2, 1000)}
	r1 := startReplica(t, cli, allocator.Config{Buckets: buckets})
	r2 := startReplica(t, cli, allocator.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := 0; i < 3; i++ {
		if _, err := r1.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Latency: durationpb.New(time.Millisecond)}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		a, err := r2.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
		if err == nil && a.GetBucket().GetId() == "p2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica 2 still allocates on the cooling bucket: %v %v", a.GetBucket().GetId(), err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A half-open bucket's one trial stays out while its upload runs: the
// upload's renewals keep it, so a long trial upload does not let a second
// one in after the trial timeout. Once the renewals stop, the trial lapses
// and the next upload may probe the bucket.
func TestRenewalsKeepTheTrialOut(t *testing.T) {
	_, cli := testenv.Etcd(t)
	var now atomic.Int64
	now.Store(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	advance := func(d time.Duration) { now.Add(int64(d)) }
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}, Now: clock, ReservationTTL: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := 0; i < 3; i++ {
		if _, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Latency: durationpb.New(time.Millisecond)}); err != nil {
			t.Fatal(err)
		}
	}
	advance(15*time.Minute + time.Second) // the cooldown is over: half-open
	trial, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
	if err != nil {
		t.Fatalf("the trial upload: %v", err)
	}
	for i := 0; i < 3; i++ { // 2 minutes of renewals, past the 1-minute trial timeout
		advance(40 * time.Second)
		if _, err := r.alloc.Renew(ctx, &allocatorv1.RenewRequest{ReservationId: trial.GetReservationId(), BucketId: "p1", ReservedBytes: 1}); err != nil {
			t.Fatal(err)
		}
	}
	advance(20 * time.Second)
	if a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1}); status.Code(err) != codes.Unavailable {
		t.Fatalf("a second upload while the trial runs: %v, %v; want UNAVAILABLE", a.GetBucket().GetId(), err)
	}
	advance(2 * time.Minute) // no renewal: the trial's upload is gone
	if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1}); err != nil {
		t.Fatalf("an upload after the trial lapsed: %v", err)
	}
}

// A Commit that carries the write's latency records the write as a success
// for the bucket's health, once: a retried Commit records nothing again,
// and a Commit without it records nothing at all.
func TestCommitRecordsTheWrite(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	fail := func() *allocatorv1.ReportOutcomeResponse {
		t.Helper()
		out, err := r.alloc.ReportOutcome(ctx, &allocatorv1.ReportOutcomeRequest{BucketId: "p1", Outcome: allocatorv1.Outcome_OUTCOME_ERROR, Latency: durationpb.New(time.Millisecond)})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	commit := func(lat *durationpb.Duration) *allocatorv1.CommitRequest {
		t.Helper()
		a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10})
		if err != nil {
			t.Fatal(err)
		}
		c := &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: 10, Size: 10, WriteLatency: lat}
		if _, err := r.alloc.Commit(ctx, c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	fail()
	if out := fail(); out.GetConsecutiveFailures() != 2 {
		t.Fatalf("after two failures: %d consecutive", out.GetConsecutiveFailures())
	}
	c := commit(durationpb.New(5 * time.Millisecond))
	deadline := time.Now().Add(5 * time.Second)
	for failures(t, r, "p1") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("a committed write did not clear the bucket's failures")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if cr, err := r.alloc.Commit(ctx, c); err != nil || !cr.GetAlreadyCommitted() {
		t.Fatalf("retried commit: %v %v", cr, err)
	}
	commit(nil)
	// A failure is written after everything recorded before it, so its
	// answer shows the whole window: F F T F.
	if out := fail(); out.GetHealthScore() != 25 || out.GetConsecutiveFailures() != 1 {
		t.Fatalf("health score %d with %d consecutive failures, want 25 (one success in four) and 1: the write was recorded more or less than once",
			out.GetHealthScore(), out.GetConsecutiveFailures())
	}
}

// An allocator started before etcd answers (its StatefulSet still
// forming) waits for it, saying so, and starts once etcd is up; the
// configured buckets are then seeded.
func TestStartWaitsForEtcd(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0") // a free port for etcd
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	cli := testenv.EtcdClient(t, "http://"+addr)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	logs := &testenv.LogBuffer{}
	started := make(chan error, 1)
	var a *allocator.Server
	go func() {
		var err error
		a, err = allocator.New(ctx, cli, allocator.Config{AdminToken: token, ServiceToken: serviceToken, Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}}, slog.New(slog.NewJSONHandler(logs, nil)))
		started <- err
	}()
	for !strings.Contains(logs.String(), "waiting for etcd") {
		select {
		case err := <-started:
			t.Fatalf("the allocator did not wait for etcd: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	srv, err := etcdembed.Start(ctx, etcdembed.Options{Dir: t.TempDir(), ClientAddr: addr, LogLevel: "fatal"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := <-started; err != nil {
		t.Fatalf("start once etcd came up: %v", err)
	}
	defer a.Close()
	resp, err := cli.Get(ctx, "/bucketlb/buckets/p1")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("configured bucket after the start: %v, %v; want it seeded", resp, err)
	}

	// Without etcd until the start's deadline, the error says so.
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	sctx, scancel := context.WithTimeout(ctx, time.Second)
	defer scancel()
	_, err = allocator.New(sctx, testenv.EtcdClient(t, "http://"+deadAddr), allocator.Config{AdminToken: token, ServiceToken: serviceToken}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "etcd at http://"+deadAddr+" did not answer") {
		t.Fatalf("start without etcd: %v, want an error naming etcd's endpoint", err)
	}
	// Stopped (SIGTERM) while it waits, it says so, not that etcd missed
	// the start's deadline.
	cctx, ccancel := context.WithCancel(ctx)
	time.AfterFunc(300*time.Millisecond, ccancel)
	_, err = allocator.New(cctx, testenv.EtcdClient(t, "http://"+deadAddr), allocator.Config{AdminToken: token, ServiceToken: serviceToken}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "stopped while waiting for etcd at http://"+deadAddr) {
		t.Fatalf("stopped while waiting for etcd: %v, want an error saying it was stopped", err)
	}
}

// Buckets are seeded from the configuration once per cluster. A bucket
// added to the configuration later, or one changed there, is not taken,
// and the allocator says so (it said nothing before), naming them.
func TestLaterConfigurationIsNamed(t *testing.T) {
	_, cli := testenv.Etcd(t)
	startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000), spec("p2", 2, 1000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	logs := &testenv.LogBuffer{}
	a, err := allocator.New(ctx, cli, allocator.Config{AdminToken: token, ServiceToken: serviceToken,
		Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000), spec("p2", 2, 5000), spec("p3", 3, 1000)}}, slog.New(slog.NewJSONHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	type line struct {
		Level   string   `json:"level"`
		Msg     string   `json:"msg"`
		Buckets []string `json:"buckets"`
	}
	var notAdded, differ []string
	for _, l := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var got line
		if err := json.Unmarshal([]byte(l), &got); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		switch {
		case got.Level == "WARN" && strings.Contains(got.Msg, "not in etcd"):
			notAdded = got.Buckets
		case strings.Contains(got.Msg, "differ from etcd"):
			differ = got.Buckets
		}
	}
	if !slices.Equal(notAdded, []string{"p3"}) || !slices.Equal(differ, []string{"p2"}) {
		t.Fatalf("logged not added %v, differing %v; want [p3] and [p2]:\n%s", notAdded, differ, logs.String())
	}
	resp, err := cli.Get(ctx, "/bucketlb/buckets/p3")
	if err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("p3 in etcd: %v %v, want absent", resp, err)
	}
}

// Every allocator counts periods from the same day of the month: usage is
// kept per period, so a replica on another day would grant every bucket's
// limit again in periods of its own. One whose day differs from the
// cluster's refuses to start, saying why and how to move the cluster.
func TestResetDayIsTheClusters(t *testing.T) {
	_, cli := testenv.Etcd(t)
	startReplica(t, cli, allocator.Config{ResetDay: 1, Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := allocator.New(ctx, cli, allocator.Config{AdminToken: token, ServiceToken: serviceToken, ResetDay: 15}, slog.New(slog.DiscardHandler))
	if !errors.Is(err, ledger.ErrResetDayMismatch) || !strings.Contains(err.Error(), "day 15") || !strings.Contains(err.Error(), "day 1 ") {
		t.Fatalf("a replica resetting on day 15 in a cluster on day 1: %v, want it refused naming both days", err)
	}
	same, err := allocator.New(ctx, cli, allocator.Config{AdminToken: token, ServiceToken: serviceToken, ResetDay: 1}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("a replica on the cluster's day: %v", err)
	}
	_ = same.Close()
}

// The shared leases commit markers and claims hang on can vanish from
// etcd (a restore from a backup taken before they were granted, a revoke
// by hand). The next Commit and claim take new ones: at most the first
// try is refused (UNAVAILABLE, retried), not every try until the lease
// would have been replaced (up to hours).
func TestVanishedSharedLeasesAreReplaced(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1<<30)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	upload := func(key string) error {
		var err error
		for try := 0; try < 2; try++ {
			var a *allocatorv1.AllocateResponse
			a, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10, Claim: &allocatorv1.IdempotencyClaim{IdempotencyKey: key, Token: "t-" + key}})
			if err == nil {
				_, err = r.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: 10, Size: 10, IdempotencyKey: key, Key: key})
			}
			if status.Code(err) != codes.Unavailable {
				return err
			}
		}
		return err
	}
	if err := upload("k0"); err != nil {
		t.Fatal(err)
	}
	for _, prefix := range []string{"/bucketlb/commits/", "/bucketlb/idem/", "/bucketlb/idemclaim/"} {
		resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
		if err != nil || len(resp.Kvs) == 0 || resp.Kvs[0].Lease == 0 {
			t.Fatalf("keys under %s: %v, %v", prefix, resp, err)
		}
		if _, err := cli.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			t.Fatal(err)
		}
	}
	for _, key := range []string{"k1", "k2", "k3"} {
		if err := upload(key); err != nil {
			t.Fatalf("upload %s after the shared leases vanished: %v", key, err)
		}
	}
}

// An upload whose hold on an idempotency key lapsed, while another upload
// under the key finished and recorded its object, is told to stop at its
// next renewal (ABORTED): it writes under the client's key, and going on
// would replace the recorded object.
func TestRenewAfterTheKeyWasRecordedStopsTheUpload(t *testing.T) {
	_, cli := testenv.Etcd(t)
	var now atomic.Int64
	now.Store(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).UnixNano())
	r := startReplica(t, cli, allocator.Config{Now: func() time.Time { return time.Unix(0, now.Load()).UTC() },
		ReservationTTL: time.Hour, Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1<<30)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	claim := func(token string) *allocatorv1.IdempotencyClaim {
		return &allocatorv1.IdempotencyClaim{IdempotencyKey: "order-9", Token: token}
	}
	slow, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 100, Claim: claim("slow")})
	if err != nil {
		t.Fatal(err)
	}
	now.Add(int64(2 * time.Hour)) // the slow upload's hold lapses
	fast, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10, Claim: claim("fast")})
	if err != nil {
		t.Fatalf("a second upload after the first one's hold lapsed: %v", err)
	}
	if _, err := r.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: fast.GetReservationId(), BucketId: "p1", ReservedBytes: 10, Size: 10, IdempotencyKey: "order-9", Key: "orders/9.bin"}); err != nil {
		t.Fatal(err)
	}
	_, err = r.alloc.Renew(ctx, &allocatorv1.RenewRequest{ReservationId: slow.GetReservationId(), BucketId: "p1", ReservedBytes: 100, Claim: claim("slow")})
	if status.Code(err) != codes.Aborted {
		t.Fatalf("renewal of the upload whose key was recorded meanwhile: %v, want ABORTED", err)
	}
}

// Without etcd the allocator refuses within 2 s (fail closed) and recovers
// by itself soon after etcd is back, however long it was gone: with gRPC's
// default reconnect backoff (up to 2 minutes), a replica refused uploads
// for 13 s after a 25 s outage, and 43 s after a 61 s one.
func TestFailClosedWithoutEtcd(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	srv, err := etcdembed.Start(ctx, etcdembed.Options{Dir: dir, LogLevel: "fatal"})
	if err != nil {
		t.Fatal(err)
	}
	addr := srv.Endpoint[len("http://"):]
	cli := testenv.EtcdClient(t, srv.Endpoint)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1<<30)}})
	if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1}); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	start := time.Now()
	_, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("allocate without etcd: %v, want Unavailable", err)
	}
	if d := time.Since(start); d > 2500*time.Millisecond {
		t.Fatalf("refusal took %s, want about 2 s at most", d)
	}
	// The outage: long enough for a default backoff to grow past 10 s.
	time.Sleep(25 * time.Second)
	srv2, err := etcdembed.Start(ctx, etcdembed.Options{Dir: dir, ClientAddr: addr, LogLevel: "fatal"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	back := time.Now()
	deadline := back.Add(2*etcdclient.MaxReconnectDelay + 3*time.Second)
	for {
		_, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("allocator still refused %s after etcd returned: %v", time.Since(back).Round(time.Millisecond), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("allocating again %s after etcd returned", time.Since(back).Round(time.Millisecond))
}

// "No room" invites a retry only when live reservations hold the room,
// which they give back soon; when committed bytes alone leave no room in
// any active bucket, only an operator can help, and RetryInfo would only
// make clients wait.
func TestNoRoomSaysWhetherToRetry(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1000)}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 800}); err != nil {
		t.Fatal(err)
	}
	retryDelay := func(err error) bool {
		for _, d := range status.Convert(err).Details() {
			if _, ok := d.(*errdetails.RetryInfo); ok {
				return true
			}
		}
		return false
	}
	_, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 500})
	if status.Code(err) != codes.ResourceExhausted || !retryDelay(err) {
		t.Fatalf("room held by a reservation: %v, want ResourceExhausted with RetryInfo", err)
	}
	_, err = r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1500})
	if status.Code(err) != codes.ResourceExhausted || retryDelay(err) {
		t.Fatalf("more than any bucket's limit: %v, want ResourceExhausted without RetryInfo", err)
	}
}

// etcd out of space (its NOSPACE alarm raised at the quota) takes no
// writes: Allocate answers UNAVAILABLE saying so, with a retry delay, not
// INTERNAL, which sent operators looking for a bug and which clients do
// not retry. A Commit refused so is marked as applying nothing (its
// upload removes the object), and a Commit already recorded is answered
// as such, even on a replica that must take a lease first: etcd applies
// the write that crosses its quota and then answers NOSPACE, so the
// refusal alone proves nothing.
func TestEtcdOutOfSpaceIsUnavailable(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv, cli := testenv.EtcdWithQuota(t, 16<<20)
	buckets := []*adminv1.BucketSpec{spec("p1", 1, 1<<40)}
	r1 := startReplica(t, testenv.EtcdClient(t, srv.Endpoint), allocator.Config{Buckets: buckets})
	r2 := startReplica(t, testenv.EtcdClient(t, srv.Endpoint), allocator.Config{Buckets: buckets})
	commit := func(a *allocatorv1.AllocateResponse, key string) *allocatorv1.CommitRequest {
		return &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId(), ReservedBytes: a.GetReservedBytes(),
			Size: 10, Key: key, Etag: `"e"`, IdempotencyKey: key}
	}
	recorded, err := r1.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10})
	if err != nil {
		t.Fatalf("Allocate before etcd fills: %v", err)
	}
	if _, err := r1.alloc.Commit(ctx, commit(recorded, "k/recorded")); err != nil {
		t.Fatal(err)
	}
	pending, err := r1.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10})
	if err != nil {
		t.Fatal(err)
	}
	testenv.FillEtcd(ctx, t, cli)
	_, err = r1.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10})
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "etcd is out of space") {
		t.Fatalf("Allocate with etcd out of space: %v, want Unavailable saying etcd is out of space", err)
	}
	var delay time.Duration
	for _, d := range status.Convert(err).Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			delay = ri.GetRetryDelay().AsDuration()
		}
	}
	if delay <= 0 {
		t.Fatalf("Allocate with etcd out of space: details %v, want a RetryInfo with a delay", status.Convert(err).Details())
	}
	_, err = r1.alloc.Commit(ctx, commit(pending, "k/pending"))
	if status.Code(err) != codes.Unavailable || !errinfo.Has(err, errinfo.NotApplied) {
		t.Fatalf("Commit with etcd out of space: %v %v, want Unavailable marked NOT_APPLIED", err, status.Convert(err).Details())
	}
	for name, r := range map[string]replica{"the committing replica": r1, "another replica": r2} {
		resp, err := r.alloc.Commit(ctx, commit(recorded, "k/recorded"))
		if err != nil || !resp.GetAlreadyCommitted() {
			t.Fatalf("recorded Commit repeated on %s with etcd out of space: %v, %v; want already committed", name, resp, err)
		}
	}
}

// An upload's bucket disabled, or pointed at another S3 bucket or
// endpoint, while the upload runs: its renewals and its commit are
// refused (BUCKET_CHANGED; the commit also NOT_APPLIED), so no client is
// told its object is in a bucket that serves nothing or does not hold
// it. A commit that applied before the change is answered as before;
// DRAINING lets running uploads finish; callers that do not say where
// they wrote are not compared.
func TestRenewAndCommitRefuseAChangedBucket(t *testing.T) {
	_, cli := testenv.Etcd(t)
	r := startReplica(t, cli, allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 1<<20)}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	actx := adminCtx(ctx, token)
	allocate := func() *allocatorv1.AllocateResponse {
		t.Helper()
		a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 100})
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	where := func(a *allocatorv1.AllocateResponse) (string, string) {
		return a.GetBucket().GetName(), a.GetBucket().GetEndpoint()
	}
	commitReq := func(a *allocatorv1.AllocateResponse) *allocatorv1.CommitRequest {
		name, endpoint := where(a)
		return &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: 100, Size: 100,
			Key: "k-" + a.GetReservationId(), BucketName: name, Endpoint: endpoint}
	}
	renew := func(a *allocatorv1.AllocateResponse) error {
		name, endpoint := where(a)
		_, err := r.alloc.Renew(ctx, &allocatorv1.RenewRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: 100, BucketName: name, Endpoint: endpoint})
		return err
	}
	changed := func(err error) bool {
		return status.Code(err) == codes.FailedPrecondition && errinfo.Has(err, errinfo.BucketChanged)
	}
	// Each replica learns of a change from its watch, within a moment.
	refusedRenew := func(a *allocatorv1.AllocateResponse, what string) {
		t.Helper()
		var err error
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if err = renew(a); changed(err) || time.Now().After(deadline) {
				break
			}
		}
		if !changed(err) {
			t.Fatalf("renewal after %s: %v, want FAILED_PRECONDITION with reason BUCKET_CHANGED", what, err)
		}
	}
	refusedCommit := func(a *allocatorv1.AllocateResponse, what string) {
		t.Helper()
		_, err := r.alloc.Commit(ctx, commitReq(a))
		if !changed(err) || !errinfo.Has(err, errinfo.NotApplied) {
			t.Fatalf("commit after %s: %v, want FAILED_PRECONDITION with reasons BUCKET_CHANGED and NOT_APPLIED", what, err)
		}
	}

	done, inFlight := allocate(), allocate()
	first, err := r.alloc.Commit(ctx, commitReq(done))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p1", State: adminv1.BucketState_BUCKET_STATE_DISABLED}); err != nil {
		t.Fatal(err)
	}
	refusedRenew(inFlight, "the bucket was disabled")
	refusedCommit(inFlight, "the bucket was disabled")
	again, err := r.alloc.Commit(ctx, commitReq(done))
	if err != nil || !again.GetAlreadyCommitted() || again.GetUsedBytes() != first.GetUsedBytes() {
		t.Fatalf("a commit applied before the bucket was disabled, retried: %v %v, want it answered as before (%v)", again, err, first)
	}

	// DRAINING takes nothing new, but running uploads finish.
	if _, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p1", State: adminv1.BucketState_BUCKET_STATE_ACTIVE}); err != nil {
		t.Fatal(err)
	}
	var running *allocatorv1.AllocateResponse
	for deadline := time.Now().Add(5 * time.Second); running == nil; time.Sleep(10 * time.Millisecond) {
		if a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 100}); err == nil {
			running = a
		} else if time.Now().After(deadline) {
			t.Fatalf("allocate once the bucket is active again: %v", err)
		}
	}
	if _, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p1", State: adminv1.BucketState_BUCKET_STATE_DRAINING}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 100}); err != nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatal("the bucket still takes new uploads while draining")
		}
	}
	if err := renew(running); err != nil {
		t.Fatalf("renewal while the bucket drains: %v", err)
	}
	if _, err := r.alloc.Commit(ctx, commitReq(running)); err != nil {
		t.Fatalf("commit while the bucket drains: %v", err)
	}

	// Moved: another S3 bucket name, then another endpoint.
	if _, err := r.admin.SetBucketState(actx, &adminv1.SetBucketStateRequest{Id: "p1", State: adminv1.BucketState_BUCKET_STATE_ACTIVE}); err != nil {
		t.Fatal(err)
	}
	var renamed, unnamed *allocatorv1.AllocateResponse
	for deadline := time.Now().Add(5 * time.Second); unnamed == nil; time.Sleep(10 * time.Millisecond) {
		if a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 100}); err == nil {
			renamed, unnamed = a, allocate()
		} else if time.Now().After(deadline) {
			t.Fatalf("allocate once the bucket is active again: %v", err)
		}
	}
	mask := func(path string) *fieldmaskpb.FieldMask { return &fieldmaskpb.FieldMask{Paths: []string{path}} }
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1", Name: "p1-elsewhere"}, UpdateMask: mask("name")}); err != nil {
		t.Fatal(err)
	}
	refusedRenew(renamed, "the bucket was renamed")
	refusedCommit(renamed, "the bucket was renamed")
	// A caller that does not say where it wrote is not compared.
	if _, err := r.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: unnamed.GetReservationId(), BucketId: "p1", ReservedBytes: 100, Size: 100}); err != nil {
		t.Fatalf("commit without a bucket name or endpoint after a rename: %v", err)
	}
	// The same endpoint written another way is no move: an upload granted
	// before the edit renews and commits once the replica has the edit.
	before := allocate()
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1", Endpoint: "HTTP://127.0.0.1:1/"}, UpdateMask: mask("endpoint")}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		a := allocate()
		if _, err := r.alloc.Release(ctx, &allocatorv1.ReleaseRequest{ReservationId: a.GetReservationId(), BucketId: "p1"}); err != nil {
			t.Fatal(err)
		}
		if a.GetBucket().GetEndpoint() == "HTTP://127.0.0.1:1/" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the replica never granted from the edited endpoint")
		}
	}
	if err := renew(before); err != nil {
		t.Fatalf("renewal after the endpoint was written another way: %v", err)
	}
	if _, err := r.alloc.Commit(ctx, commitReq(before)); err != nil {
		t.Fatalf("commit after the endpoint was written another way: %v", err)
	}
	moved := allocate()
	if _, err := r.admin.PutBucket(actx, &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: "p1", Endpoint: "http://127.0.0.1:2"}, UpdateMask: mask("endpoint")}); err != nil {
		t.Fatal(err)
	}
	refusedRenew(moved, "the bucket's endpoint changed")
	refusedCommit(moved, "the bucket's endpoint changed")

	// Counted: the first commit, the draining one, the uncompared one and
	// the one after the endpoint was rewritten.
	if u, _ := used(t, r, "p1"); u != 400 {
		t.Fatalf("p1 used %d bytes, want 400", u)
	}
}
