package allocator_test

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/ledger/ledgertest"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

// Invariant 1 through the real service: 4 allocator replicas, each with
// its own etcd client and gRPC server, 64 concurrent callers, random sizes
// against small limits, commits (retried on other replicas), releases and
// abandoned reservations whose leases expire. Replaying etcd's history
// shows used + reserved <= limit at every revision, and final usage equals
// the sum of committed sizes.
func TestNoOvercommitAcrossReplicas(t *testing.T) {
	srv, cli0 := testenv.Etcd(t)
	buckets := []*adminv1.BucketSpec{spec("r1", 1, 400_000), spec("r2", 2, 300_000), spec("r3", 3, 200_000)}
	limits := map[string]int64{}
	for _, b := range buckets {
		limits[b.Id] = b.MonthlyLimitBytes
	}
	var replicas []replica
	for i := 0; i < 4; i++ {
		replicas = append(replicas, startReplica(t, testenv.EtcdClient(t, srv.Endpoint), allocator.Config{
			Buckets: buckets, ReservationTTL: 3 * time.Second,
			Strategy: allocatorv1.Strategy(1 + i%3), // replicas use different default strategies
		}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var committed [3]atomic.Int64
	idx := map[string]int{"r1": 0, "r2": 1, "r3": 2}
	var granted, refused, lapsed atomic.Int64
	var wg sync.WaitGroup
	for c := 0; c < 64; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(c), 7))
			for i := 0; i < 30 && ctx.Err() == nil; i++ {
				r := replicas[rnd.IntN(4)]
				size := 500 + rnd.Int64N(4000)
				a, err := r.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: size})
				if status.Code(err) == codes.ResourceExhausted {
					refused.Add(1)
					continue
				}
				if err != nil {
					t.Errorf("allocate: %v", err)
					return
				}
				granted.Add(1)
				switch k := rnd.IntN(10); {
				case k == 0: // abandon: the lease expires
				case k < 4:
					if _, err := replicas[rnd.IntN(4)].alloc.Release(ctx, &allocatorv1.ReleaseRequest{ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId()}); err != nil {
						t.Errorf("release: %v", err)
					}
				default:
					req := &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId(),
						ReservedBytes: size, Size: size - rnd.Int64N(size/2)}
					if _, err := replicas[rnd.IntN(4)].alloc.Commit(ctx, req); status.Code(err) == codes.FailedPrecondition {
						// Lapsed under load and no room to re-establish:
						// refused cleanly, nothing counted (invariant 2).
						lapsed.Add(1)
						continue
					} else if err != nil {
						t.Errorf("commit: %v", err)
						continue
					}
					if cr, err := replicas[rnd.IntN(4)].alloc.Commit(ctx, req); err != nil || !cr.GetAlreadyCommitted() {
						t.Errorf("retried commit: %v %v", cr, err)
					}
					committed[idx[a.GetBucket().GetId()]].Add(req.GetSize())
				}
			}
		}(c)
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if refused.Load() == 0 {
		t.Fatal("no allocation was refused: limits too large to test overcommit")
	}
	used, revisions, err := ledgertest.Replay(ctx, cli0, "/bucketlb/", ledger.PeriodAt(time.Now(), 1).Name, limits)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d granted, %d refused, %d lapsed before commit, %d revisions replayed", granted.Load(), refused.Load(), lapsed.Load(), revisions)
	for id, i := range idx {
		if used[id] != committed[i].Load() {
			t.Fatalf("bucket %s: usage %d != sum of committed sizes %d", id, used[id], committed[i].Load())
		}
	}
}

// One reservation committed at the same moment on the replica that
// granted it and on another (a Commit retried elsewhere while the first
// attempt runs): counted once, and its bytes are not held as reserved
// until the reservation's expiry, well past the commit.
func TestRacingCommitsFreeTheReservation(t *testing.T) {
	srv, cli := testenv.Etcd(t)
	cfg := allocator.Config{Buckets: []*adminv1.BucketSpec{spec("b", 1, 1<<30)}, ReservationTTL: time.Minute}
	a := startReplica(t, cli, cfg)
	b := startReplica(t, testenv.EtcdClient(t, srv.Endpoint), cfg)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const pairs = 40
	for range pairs {
		g, err := a.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 300})
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for _, r := range []replica{a, b} {
			wg.Go(func() {
				if _, err := r.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: g.GetReservationId(), BucketId: "b", ReservedBytes: 300, Size: 250}); err != nil {
					t.Errorf("racing commit: %v", err)
				}
			})
		}
		wg.Wait()
	}
	// Idle capacity blocks go back within a second; a reservation left in
	// a replica's view would stay reserved for the minute of its TTL.
	deadline := time.Now().Add(15 * time.Second)
	for {
		usedA, reservedA := used(t, a, "b")
		_, reservedB := used(t, b, "b")
		if reservedA == 0 && reservedB == 0 {
			if usedA != pairs*250 {
				t.Fatalf("used %d, want %d (each commit counted once)", usedA, pairs*250)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("15 s after the commits, replicas still show %d and %d bytes reserved", reservedA, reservedB)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
