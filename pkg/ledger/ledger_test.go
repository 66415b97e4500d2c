package ledger_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/ledger/ledgertest"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

func bucket(id string, limit int64) *adminv1.BucketSpec {
	return &adminv1.BucketSpec{Id: id, Name: id, Endpoint: "http://x", CredentialsRef: "R", MonthlyLimitBytes: limit,
		State: adminv1.BucketState_BUCKET_STATE_ACTIVE}
}

func TestReserveCommitRelease(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l := ledger.New(cli, ledger.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b := bucket("b1", 1000)

	r1, err := l.Reserve(ctx, b, 600, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Reserve(ctx, b, 500, 10*time.Second); !errors.Is(err, ledger.ErrNoRoom) {
		t.Fatalf("second reserve over limit: err %v, want ErrNoRoom", err)
	}
	res, err := l.Commit(ctx, b, r1.ID, 550, nil)
	if err != nil || res.UsedAfter != 550 || res.AlreadyCommitted {
		t.Fatalf("commit = %+v, %v", res, err)
	}
	again, err := l.Commit(ctx, b, r1.ID, 550, nil)
	if err != nil || !again.AlreadyCommitted || again.UsedAfter != 550 {
		t.Fatalf("retried commit = %+v, %v; want the first answer, flagged", again, err)
	}
	r2, err := l.Reserve(ctx, b, 450, 10*time.Second)
	if err != nil {
		t.Fatalf("reserve the remaining 450: %v", err)
	}
	if err := l.Release(ctx, b.Id, r2.ID); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx, b.Id, r2.ID); err != nil {
		t.Fatalf("second release must succeed: %v", err)
	}
	u, _, err := l.Usages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if u["b1"].Used != 550 || u["b1"].Reserved != 0 {
		t.Fatalf("usage = %+v, want used 550 reserved 0", u["b1"])
	}
}

// A holder that stops renewing loses its reservation within the TTL; a
// holder that renews keeps it past several TTLs; a lapsed reservation is
// re-established on Renew only if there is room.
func TestLeaseExpiryAndRenewal(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l := ledger.New(cli, ledger.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b := bucket("b1", 1000)
	const ttl = 2 * time.Second

	kept, err := l.Reserve(ctx, b, 300, ttl)
	if err != nil {
		t.Fatal(err)
	}
	dropped, err := l.Reserve(ctx, b, 700, ttl)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// Renew `kept` every ttl/3 until `dropped` is gone, then for 3 more TTLs.
	for {
		if _, re, err := l.Renew(ctx, b, kept.ID, 300, ttl); err != nil || re {
			t.Fatalf("renew: reestablished=%v err=%v", re, err)
		}
		u, _, err := l.Usages(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if u["b1"].Reserved == 300 {
			break
		}
		if time.Since(start) > 4*ttl {
			t.Fatalf("abandoned reservation still held after %s (reserved %d)", time.Since(start), u["b1"].Reserved)
		}
		time.Sleep(ttl / 3) // renewal cadence of a live holder
	}
	// Capacity came back: 700 fits again.
	other, err := l.Reserve(ctx, b, 700, 30*time.Second)
	if err != nil {
		t.Fatalf("capacity of the expired reservation did not return: %v", err)
	}
	for i := 0; i < 9; i++ { // 3 TTLs of renewals
		if _, re, err := l.Renew(ctx, b, kept.ID, 300, ttl); err != nil || re {
			t.Fatalf("renew %d: reestablished=%v err=%v", i, re, err)
		}
		time.Sleep(ttl / 3)
	}
	// Let `kept` lapse while `other` holds the rest: it cannot come back.
	if err := l.Release(ctx, b.Id, kept.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Reserve(ctx, b, 300, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, _, err := l.Renew(ctx, b, kept.ID, 300, ttl); !errors.Is(err, ledger.ErrReservationLost) {
		t.Fatalf("renew of a lapsed reservation with no room: %v, want ErrReservationLost", err)
	}
	if _, err := l.Commit(ctx, b, kept.ID, 300, nil); !errors.Is(err, ledger.ErrReservationLost) {
		t.Fatalf("commit of a lapsed reservation with no room: %v, want ErrReservationLost", err)
	}
	// With room, a lapsed reservation is re-established.
	if err := l.Release(ctx, b.Id, other.ID); err != nil {
		t.Fatal(err)
	}
	if _, re, err := l.Renew(ctx, b, kept.ID, 300, ttl); err != nil || !re {
		t.Fatalf("renew with room: reestablished=%v err=%v, want re-established", re, err)
	}
	_ = dropped
}

// Invariant 1 under races: 4 ledgers on their own clients, 64 callers,
// random sizes against small limits, commits, releases and abandoned
// reservations whose leases expire. Then replay etcd's history from
// revision 1 and check used + reserved <= limit at every revision, and
// that final usage equals the sum of committed sizes.
func TestNoOvercommitHistory(t *testing.T) {
	srv, cli0 := testenv.Etcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	buckets := []*adminv1.BucketSpec{bucket("h1", 600_000), bucket("h2", 400_000), bucket("h3", 300_000)}
	limits := map[string]int64{}
	for _, b := range buckets {
		limits[b.Id] = b.MonthlyLimitBytes
	}
	var ledgers []*ledger.Ledger
	for i := 0; i < 4; i++ {
		ledgers = append(ledgers, ledger.New(testenv.EtcdClient(t, srv.Endpoint), ledger.Options{}))
	}
	var committed sync.Map // bucket -> *atomic.Int64
	for _, b := range buckets {
		committed.Store(b.Id, new(atomic.Int64))
	}
	var ops, full atomic.Int64
	var wg sync.WaitGroup
	const callers, perCaller = 64, 40
	for c := 0; c < callers; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(c), 99))
			l := ledgers[c%len(ledgers)]
			for i := 0; i < perCaller && ctx.Err() == nil; i++ {
				b := buckets[rnd.IntN(len(buckets))]
				size := 500 + rnd.Int64N(4000)
				ttl := 30 * time.Second
				abandon := rnd.IntN(10) == 0
				if abandon {
					ttl = 2 * time.Second
				}
				r, err := l.Reserve(ctx, b, size, ttl)
				if errors.Is(err, ledger.ErrNoRoom) {
					full.Add(1)
					continue
				}
				if err != nil {
					t.Errorf("reserve: %v", err)
					return
				}
				ops.Add(1)
				switch {
				case abandon:
				case rnd.IntN(3) == 0:
					if err := l.Release(ctx, b.Id, r.ID); err != nil {
						t.Errorf("release: %v", err)
					}
				default:
					actual := size - rnd.Int64N(size/2)
					// Commit through a different ledger half the time, and
					// retry it once: exactly-once must hold.
					cl := ledgers[rnd.IntN(len(ledgers))]
					if _, err := cl.Commit(ctx, b, r.ID, actual, nil); err != nil {
						t.Errorf("commit: %v", err)
						continue
					}
					if res, err := l.Commit(ctx, b, r.ID, actual, nil); err != nil || !res.AlreadyCommitted {
						t.Errorf("retried commit: %+v %v", res, err)
					}
					v, _ := committed.Load(b.Id)
					v.(*atomic.Int64).Add(actual)
				}
			}
		}(c)
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	t.Logf("%d reservations granted, %d refused for lack of room", ops.Load(), full.Load())
	if full.Load() == 0 {
		t.Fatal("no allocation was ever refused: limits too large to test overcommit")
	}

	// Replay the whole history.
	used, revisions, err := ledgertest.Replay(ctx, cli0, ledgers[0].Prefix(), ledgers[0].Period().Name, limits)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("replayed %d revisions", revisions)
	for _, b := range buckets {
		v, _ := committed.Load(b.Id)
		if used[b.Id] != v.(*atomic.Int64).Load() {
			t.Fatalf("bucket %s: usage %d != sum of committed sizes %d", b.Id, used[b.Id], v.(*atomic.Int64).Load())
		}
	}
}

func TestSeedOnce(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l := ledger.New(cli, ledger.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if ok, err := l.SeedBuckets(ctx, []*adminv1.BucketSpec{bucket("a", 1)}); err != nil || !ok {
		t.Fatalf("first seed: %v %v", ok, err)
	}
	if err := l.DeleteBucket(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if ok, err := l.SeedBuckets(ctx, []*adminv1.BucketSpec{bucket("a", 1), bucket("b", 1)}); err != nil || ok {
		t.Fatalf("second seed wrote (%v, %v); etcd must stay the source of truth", ok, err)
	}
	specs, _, err := l.ListBuckets(ctx)
	if err != nil || len(specs) != 0 {
		t.Fatalf("buckets after reseed = %v, %v; want none", specs, err)
	}
}

func TestPeriod(t *testing.T) {
	cases := []struct {
		at   string
		day  int
		want string
	}{
		{"2026-11-25T10:00:00Z", 1, "2026-11"},
		{"2026-11-01T00:00:00Z", 1, "2026-11"},
		{"2026-11-14T23:59:59Z", 15, "2026-10-15"},
		{"2026-11-15T00:00:00Z", 15, "2026-11-15"},
		{"2027-01-03T00:00:00Z", 5, "2026-12-05"},
	}
	for _, tc := range cases {
		at, _ := time.Parse(time.RFC3339, tc.at)
		if got := ledger.PeriodAt(at, tc.day).Name; got != tc.want {
			t.Errorf("PeriodAt(%s, %d) = %s, want %s", tc.at, tc.day, got, tc.want)
		}
	}
}
