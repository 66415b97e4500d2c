package ledger_test

import (
	"context"
	"errors"
	"fmt"
	"google.golang.org/protobuf/proto"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/config"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/ledger/ledgertest"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func bucket(id string, limit int64) *adminv1.BucketSpec {
	return &adminv1.BucketSpec{Id: id, Name: id, Endpoint: "http://x", CredentialsRef: "R", MonthlyLimitBytes: limit,
		State: adminv1.BucketState_BUCKET_STATE_ACTIVE}
}

// replicaCap starts a capacity manager for one replica on cli.
func replicaCap(t *testing.T, cli *clientv3.Client, id string) (*ledger.Ledger, *ledger.Capacity) {
	t.Helper()
	return replicaCapWith(t, cli, id, ledger.Options{})
}

func replicaCapWith(t *testing.T, cli *clientv3.Client, id string, opts ledger.Options) (*ledger.Ledger, *ledger.Capacity) {
	t.Helper()
	l := ledger.New(cli, opts)
	c := l.NewCapacity(id, 2*time.Second, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return l, c
}

func usage(t *testing.T, l *ledger.Ledger, id string) ledger.Usage {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	u, _, err := l.Usages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return u[id]
}

func liveReservations(t *testing.T, l *ledger.Ledger, id string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := l.LiveReservations(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// poll retries cond every 10 ms until it holds or the deadline passes.
func poll(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReserveCommitRelease(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l, c := replicaCap(t, cli, "r1")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b := bucket("b1", 1000)

	r1, err := c.Reserve(ctx, b, 600, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Reserve(ctx, b, 500, 10*time.Second); !errors.Is(err, ledger.ErrNoRoom) {
		t.Fatalf("second reserve over limit: err %v, want ErrNoRoom", err)
	}
	res, err := c.Commit(ctx, b, r1.ID, 550, nil)
	if err != nil || res.AlreadyCommitted {
		t.Fatalf("commit = %+v, %v", res, err)
	}
	again, err := c.Commit(ctx, b, r1.ID, 550, nil)
	if err != nil || !again.AlreadyCommitted {
		t.Fatalf("retried commit = %+v, %v; want the first answer, flagged", again, err)
	}
	// A committed reservation is over: a late Renew does not bring it
	// back to hold the room again.
	if _, _, err := c.Renew(ctx, b, r1.ID, 600, 10*time.Second); !errors.Is(err, ledger.ErrInvalid) {
		t.Fatalf("renew of a committed reservation: %v, want ErrInvalid", err)
	}
	r2, err := c.Reserve(ctx, b, 450, 10*time.Second)
	if err != nil {
		t.Fatalf("reserve the remaining 450: %v", err)
	}
	if _, err := c.Commit(ctx, b, r2.ID, 451, nil); !errors.Is(err, ledger.ErrInvalid) {
		t.Fatalf("commit above the reservation: %v, want ErrInvalid", err)
	}
	if err := c.Release(ctx, b.Id, r2.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.Release(ctx, b.Id, r2.ID); err != nil {
		t.Fatalf("second release must succeed: %v", err)
	}
	if u := usage(t, l, "b1"); u.Used != 550 || liveReservations(t, l, "b1") != 0 {
		t.Fatalf("usage = %+v, want used 550 and no reservations", u)
	}
	// Idle block capacity goes back to the bucket.
	poll(t, 5*time.Second, "idle block to be returned", func() bool { return usage(t, l, "b1").Reserved == 0 })
	// An admin reset is not undone by the replica's next commit.
	if prev, err := l.SetUsage(ctx, "b1", 0); err != nil || prev != 550 {
		t.Fatalf("SetUsage: prev %d, %v", prev, err)
	}
	r3, err := c.Reserve(ctx, b, 100, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Commit(ctx, b, r3.ID, 100, nil); err != nil {
		t.Fatal(err)
	}
	if u := usage(t, l, "b1"); u.Used != 100 {
		t.Fatalf("usage after reset and one commit = %d, want 100", u.Used)
	}
}

// A holder that stops renewing loses its reservation within the TTL; a
// holder that renews keeps it past several TTLs; a lapsed reservation is
// re-established on Renew only if there is room. Renewals and commits may
// reach any replica.
func TestLeaseExpiryAndRenewal(t *testing.T) {
	srv, cli := testenv.Etcd(t)
	l, c := replicaCap(t, cli, "r1")
	_, other := replicaCap(t, testenv.EtcdClient(t, srv.Endpoint), "r2")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b := bucket("b1", 1000)
	const ttl = 2 * time.Second

	kept, err := c.Reserve(ctx, b, 300, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Reserve(ctx, b, 700, ttl); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for liveReservations(t, l, "b1") != 1 {
		// Renew through the other replica: the owner must honour it.
		if _, re, err := other.Renew(ctx, b, kept.ID, 300, ttl); err != nil || re {
			t.Fatalf("renew: reestablished=%v err=%v", re, err)
		}
		if time.Since(start) > 4*ttl {
			t.Fatal("abandoned reservation still held after 4 TTLs")
		}
		time.Sleep(ttl / 4) // renewal cadence of a live holder
	}
	if _, err := c.Reserve(ctx, b, 700, 30*time.Second); err != nil {
		t.Fatalf("capacity of the expired reservation did not return: %v (usage %+v)", err, usage(t, l, "b1"))
	}
	for i := 0; i < 12; i++ { // 3 TTLs of renewals
		if _, re, err := c.Renew(ctx, b, kept.ID, 300, ttl); err != nil || re {
			t.Fatalf("renew %d: reestablished=%v err=%v", i, re, err)
		}
		time.Sleep(ttl / 4)
	}
	if err := c.Release(ctx, b.Id, kept.ID); err != nil {
		t.Fatal(err)
	}
	// The released bytes sit in the first replica's block until it has
	// been idle for a moment, then any replica can take them.
	var filler *ledger.Reservation
	poll(t, 5*time.Second, "released capacity to reach the other replica", func() bool {
		var err error
		filler, err = other.Reserve(ctx, b, 300, 30*time.Second)
		return err == nil
	})
	if _, _, err := c.Renew(ctx, b, kept.ID, 300, ttl); !errors.Is(err, ledger.ErrReservationLost) {
		t.Fatalf("renew of a lapsed reservation with no room: %v, want ErrReservationLost", err)
	}
	if _, err := other.Commit(ctx, b, kept.ID, 300, nil); !errors.Is(err, ledger.ErrReservationLost) {
		t.Fatalf("commit of a lapsed reservation with no room: %v, want ErrReservationLost", err)
	}
	if err := other.Release(ctx, b.Id, filler.ID); err != nil {
		t.Fatal(err)
	}
	if _, re, err := other.Renew(ctx, b, kept.ID, 300, ttl); err != nil || !re {
		t.Fatalf("renew with room: reestablished=%v err=%v, want re-established", re, err)
	}
}

// Invariant 1 under races: 4 replicas on their own clients, 64 callers,
// random sizes against small limits, commits through other replicas,
// releases and abandoned reservations whose TTLs expire. Replaying etcd's
// history checks usage + blocks <= limit at every revision, and that
// final usage equals the sum of committed sizes.
func TestNoOvercommitHistory(t *testing.T) {
	srv, cli0 := testenv.Etcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	buckets := []*adminv1.BucketSpec{bucket("h1", 600_000), bucket("h2", 400_000), bucket("h3", 300_000)}
	limits := map[string]int64{}
	for _, b := range buckets {
		limits[b.Id] = b.MonthlyLimitBytes
	}
	var caps []*ledger.Capacity
	var l0 *ledger.Ledger
	for i := 0; i < 4; i++ {
		l, c := replicaCap(t, testenv.EtcdClient(t, srv.Endpoint), fmt.Sprint("r", i))
		caps = append(caps, c)
		l0 = l
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
			cp := caps[c%len(caps)]
			for i := 0; i < perCaller && ctx.Err() == nil; i++ {
				b := buckets[rnd.IntN(len(buckets))]
				size := 500 + rnd.Int64N(4000)
				ttl := 30 * time.Second
				abandon := rnd.IntN(10) == 0
				if abandon {
					ttl = time.Second
				}
				r, err := cp.Reserve(ctx, b, size, ttl)
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
					if err := caps[rnd.IntN(len(caps))].Release(ctx, b.Id, r.ID); err != nil {
						t.Errorf("release: %v", err)
					}
				default:
					actual := size - rnd.Int64N(size/2)
					cl := caps[rnd.IntN(len(caps))]
					if _, err := cl.Commit(ctx, b, r.ID, actual, nil); err != nil {
						t.Errorf("commit: %v", err)
						continue
					}
					if res, err := cp.Commit(ctx, b, r.ID, actual, nil); err != nil || !res.AlreadyCommitted {
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
	used, revisions, err := ledgertest.Replay(ctx, cli0, l0.Prefix(), l0.Period().Name, limits)
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
	// An operator stored "x" through the admin API before the
	// configuration named any bucket: the first seeding keeps it.
	byOperator := bucket("x", 1)
	byOperator.State = adminv1.BucketState_BUCKET_STATE_DISABLED
	if _, err := l.StoreBucket(ctx, "x", func(*adminv1.BucketSpec) (*adminv1.BucketSpec, error) { return byOperator, nil }); err != nil {
		t.Fatal(err)
	}
	ok, kept, err := l.SeedBuckets(ctx, []*adminv1.BucketSpec{bucket("a", 1), bucket("x", 1)})
	if err != nil || !ok || !slices.Equal(kept, []string{"x"}) {
		t.Fatalf("first seed: %v, kept %v, %v; want seeded, x kept", ok, kept, err)
	}
	if got, err := l.GetBucket(ctx, "x"); err != nil || !proto.Equal(got, byOperator) {
		t.Fatalf("the operator's bucket after seeding: %v, %v; want it unchanged", got, err)
	}
	if err := l.DeleteBucket(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := l.DeleteBucket(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if ok, _, err := l.SeedBuckets(ctx, []*adminv1.BucketSpec{bucket("a", 1), bucket("b", 1)}); err != nil || ok {
		t.Fatalf("second seed wrote (%v, %v); etcd must stay the source of truth", ok, err)
	}
	specs, _, err := l.ListBuckets(ctx)
	if err != nil || len(specs) != 0 {
		t.Fatalf("buckets after reseed = %v, %v; want none", specs, err)
	}
}

// As many buckets as a configuration may seed go in one seeding; more are
// refused at once as invalid, not sent to etcd to fail there.
func TestSeedAsManyAsAllowed(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l := ledger.New(cli, ledger.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if ledger.MaxSeedBuckets != config.MaxBuckets {
		t.Fatalf("config lets %d buckets be configured, the ledger seeds %d", config.MaxBuckets, ledger.MaxSeedBuckets)
	}
	specs := make([]*adminv1.BucketSpec, ledger.MaxSeedBuckets+1)
	for i := range specs {
		specs[i] = bucket(fmt.Sprintf("b%03d", i), 1)
	}
	if _, _, err := l.SeedBuckets(ctx, specs); !errors.Is(err, ledger.ErrInvalid) {
		t.Fatalf("seeding %d buckets: %v, want ErrInvalid", len(specs), err)
	}
	if ok, _, err := l.SeedBuckets(ctx, specs[:ledger.MaxSeedBuckets]); err != nil || !ok {
		t.Fatalf("seeding %d buckets: %v, %v", ledger.MaxSeedBuckets, ok, err)
	}
	if got, _, err := l.ListBuckets(ctx); err != nil || len(got) != ledger.MaxSeedBuckets {
		t.Fatalf("%d buckets stored (%v), want %d", len(got), err, ledger.MaxSeedBuckets)
	}
}

// A commit's marker and its upload's record last at least as long as
// configured: they hang on leases shared for a quarter of the TTL, which
// are therefore granted for 5/4 of it. Granted for the TTL alone, a key
// written late in a lease's quarter lived 3/4 of it, and a retry inside
// the TTL was counted again.
func TestCommitKeysLiveTheirTTL(t *testing.T) {
	_, cli := testenv.Etcd(t)
	const ttl = 40 * time.Second
	_, c := replicaCapWith(t, cli, "r1", ledger.Options{CommitMarkerTTL: ttl, IdempotencyTTL: 2 * ttl})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b := bucket("b1", 10000)
	r, err := c.Reserve(ctx, b, 100, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Commit(ctx, b, r.ID, 100, &ledger.Idempotency{Key: "k1", Record: []byte(`{"size":100}`)}); err != nil {
		t.Fatal(err)
	}
	for prefix, want := range map[string]time.Duration{"/bucketlb/commits/": ttl, "/bucketlb/idem/": 2 * ttl} {
		resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
		if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
			t.Fatalf("keys under %s: %v, %v; want one on a lease", prefix, resp, err)
		}
		l, err := cli.TimeToLive(ctx, clientv3.LeaseID(resp.Kvs[0].Lease))
		if err != nil {
			t.Fatal(err)
		}
		if granted := time.Duration(l.GrantedTTL) * time.Second; granted < want+want/4 {
			t.Fatalf("the lease of %s was granted for %v; with a quarter of %v shared, its keys could live only %v", resp.Kvs[0].Key, granted, want, granted-want/4)
		}
	}
}

// A shared lease commit markers hang on that etcd no longer has (restored
// from an older backup, revoked by hand) costs one refused try inside a
// Commit, which then takes a new lease: the Commit itself succeeds.
func TestCommitReplacesAVanishedMarkerLease(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l, c := replicaCap(t, cli, "r1")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b := bucket("b1", 10000)
	commit := func() error {
		r, err := c.Reserve(ctx, b, 100, time.Minute)
		if err != nil {
			return err
		}
		_, err = c.Commit(ctx, b, r.ID, 100, nil)
		return err
	}
	if err := commit(); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, l.Prefix()+"commits/", clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("commit markers: %v, %v", resp, err)
	}
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	if err := commit(); err != nil {
		t.Fatalf("a commit after its marker lease vanished: %v", err)
	}
	if u := usage(t, l, "b1"); u.Used != 200 {
		t.Fatalf("usage %d, want 200", u.Used)
	}
}

// heldGrants holds grants of ttl-second leases, once hold is set, until
// released; blocked receives each grant it holds.
type heldGrants struct {
	clientv3.Lease
	ttl      int64
	hold     atomic.Bool
	open     chan struct{}
	openOnce sync.Once
	blocked  chan struct{}
}

func (h *heldGrants) Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error) {
	if ttl == h.ttl && h.hold.Load() {
		select {
		case h.blocked <- struct{}{}:
		default:
		}
		select {
		case <-h.open:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return h.Lease.Grant(ctx, ttl)
}

// release lets held grants through.
func (h *heldGrants) release() { h.openOnce.Do(func() { close(h.open) }) }

// betweenLeases starts a replica, revokes its lease, and returns it once
// its grant of the next lease is held (until the test releases it), with
// a bucket it has reserved on.
func betweenLeases(ctx context.Context, t *testing.T) (*ledger.Capacity, *heldGrants, *adminv1.BucketSpec) {
	t.Helper()
	srv, admin := testenv.Etcd(t)
	cli := testenv.EtcdClient(t, srv.Endpoint)
	held := &heldGrants{Lease: cli.Lease, ttl: 2, open: make(chan struct{}), blocked: make(chan struct{}, 1)}
	cli.Lease = held
	_, c := replicaCap(t, cli, "r1") // its lease is granted for 2 s
	t.Cleanup(held.release)          // before the replica stops (cleanups run last first)
	b := bucket("b1", 10000)
	r, err := c.Reserve(ctx, b, 100, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	held.hold.Store(true)
	if _, err := admin.Revoke(ctx, r.LeaseID); err != nil {
		t.Fatal(err)
	}
	select { // the term ended and the next grant is held
	case <-held.blocked:
	case <-ctx.Done():
		t.Fatal("the replica never asked for a new lease after its own was revoked")
	}
	return c, held, b
}

// A replica whose lease ended is without one until etcd grants the next:
// a call in that gap waits for the new lease rather than failing at once
// (an upload's Commit, retried within milliseconds, ran out of tries in
// such a gap under load).
func TestACallBetweenLeasesWaitsForTheNext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, held, b := betweenLeases(ctx, t)
	// The gap lasts longer than a call that fails at once takes, and less
	// than the second a call waits for the next lease.
	time.AfterFunc(200*time.Millisecond, held.release)
	r, err := c.Reserve(ctx, b, 100, time.Minute)
	if err != nil {
		t.Fatalf("a reservation asked for between two leases: %v", err)
	}
	if _, err := c.Commit(ctx, b, r.ID, 100, nil); err != nil {
		t.Fatalf("its commit: %v", err)
	}
}

// A replica that cannot get its next lease refuses calls rather than
// holding them: a call whose deadline comes before the moment's wait for
// the next lease would end is refused at once, while it can still be
// retried on another replica, and a call with time to spare is refused
// once the moment has passed.
func TestAReplicaWithoutALeaseRefusesCalls(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, _, b := betweenLeases(ctx, t)
	for _, d := range []time.Duration{300 * time.Millisecond, 10 * time.Second} {
		cctx, ccancel := context.WithTimeout(ctx, d)
		_, err := c.Reserve(cctx, b, 100, time.Minute)
		if err == nil || cctx.Err() != nil {
			t.Fatalf("a reservation with %v to spare from a replica without a lease: %v (its context: %v); want a refusal before its deadline", d, err, cctx.Err())
		}
		ccancel()
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

// Invariant 2 when the granting replica dies: its block and reservations
// vanish with its lease (within the TTL), the capacity returns, and a
// Renew or Commit on another replica re-establishes the reservation
// against current capacity.
func TestGrantingReplicaDies(t *testing.T) {
	srv, _ := testenv.Etcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b := bucket("b1", 1000)

	// The doomed replica gets its own client, closed to simulate a crash:
	// no revoke reaches etcd, the lease has to expire.
	doomedCli, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	doomedLedger := ledger.New(doomedCli, ledger.Options{})
	doomed := doomedLedger.NewCapacity("doomed", 2*time.Second, slog.New(slog.DiscardHandler))
	dctx, dcancel := context.WithCancel(context.Background())
	ddone := make(chan struct{})
	go func() { _ = doomed.Run(dctx); close(ddone) }()

	l, other := replicaCap(t, testenv.EtcdClient(t, srv.Endpoint), "survivor")
	r, err := doomed.Reserve(ctx, b, 400, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Reserve(ctx, b, 700, time.Minute); !errors.Is(err, ledger.ErrNoRoom) {
		t.Fatalf("700 more bytes fit beside a 400-byte reservation in a 1000-byte bucket: %v", err)
	}
	doomedCli.Close()
	dcancel()
	<-ddone
	start := time.Now()
	poll(t, 10*time.Second, "the dead replica's block to expire", func() bool {
		return usage(t, l, "b1").Reserved == 0 && liveReservations(t, l, "b1") == 0
	})
	t.Logf("dead replica's capacity returned after %s", time.Since(start).Round(10*time.Millisecond))
	exp, re, err := other.Renew(ctx, b, r.ID, 400, time.Minute)
	if err != nil || !re || exp.IsZero() {
		t.Fatalf("renew on the survivor: reestablished=%v err=%v, want re-established", re, err)
	}
	// The re-established reservation keeps the dead replica's id, so its
	// key is not under the survivor's watch: a third replica with no room
	// of its own must not commit it out of the survivor's block (the
	// survivor would never learn its block shrank), and fails cleanly.
	if _, err := other.Reserve(ctx, b, 600, time.Minute); err != nil {
		t.Fatalf("fill the bucket: %v", err)
	}
	_, third := replicaCap(t, testenv.EtcdClient(t, srv.Endpoint), "third")
	if _, err := third.Commit(ctx, b, r.ID, 350, nil); !errors.Is(err, ledger.ErrReservationLost) {
		t.Fatalf("commit of a re-established reservation on a replica without room: %v, want ErrReservationLost", err)
	}
	if _, err := other.Commit(ctx, b, r.ID, 350, nil); err != nil {
		t.Fatal(err)
	}
	if u := usage(t, l, "b1"); u.Used != 350 {
		t.Fatalf("usage %d, want 350", u.Used)
	}
}

// TestCommitMarkersExpireBeforeIdempotencyRecords: commit markers (only
// needed for a commit retried within seconds) leave etcd after their short
// TTL, so their number stays bounded by rate × TTL, while the upload's
// idempotency record stays for its own, longer TTL.
func TestCommitMarkersExpireBeforeIdempotencyRecords(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l, c := replicaCapWith(t, cli, "r1", ledger.Options{CommitMarkerTTL: 2 * time.Second, IdempotencyTTL: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b := bucket("b1", 1000)
	r, err := c.Reserve(ctx, b, 100, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Commit(ctx, b, r.ID, 100, &ledger.Idempotency{Key: "upload-1", Record: []byte(`{"size":100}`)}); err != nil {
		t.Fatal(err)
	}
	if again, err := c.Commit(ctx, b, r.ID, 100, nil); err != nil || !again.AlreadyCommitted {
		t.Fatalf("retried commit = %+v, %v; want the first answer, flagged", again, err)
	}
	markers := func() int64 {
		resp, err := cli.Get(ctx, "/bucketlb/commits/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		return resp.Count
	}
	if n := markers(); n != 1 {
		t.Fatalf("%d commit markers after one commit, want 1", n)
	}
	poll(t, 10*time.Second, "the commit marker to expire", func() bool { return markers() == 0 })
	if rec, ok, err := l.UploadRecord(ctx, "upload-1"); err != nil || !ok || string(rec) != `{"size":100}` {
		t.Fatalf("idempotency record after the marker expired: %q, %v, %v; want it kept", rec, ok, err)
	}
}

// A Reserve whose caller gives up mid-call holds nothing past the
// reservation's TTL: a write the writer never took frees its bytes at
// once, and one it took is waited for, so its outcome is known. Before,
// a caller's cancellation made every such write look ambiguous, and its
// bytes were held for TTL + 2 minutes.
func TestCancelledReserveHoldsNothingPastItsTTL(t *testing.T) {
	_, cli := testenv.Etcd(t)
	_, c := replicaCap(t, cli, "r1")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b := bucket("b1", 1000)
	// The block holds the whole bucket, so the cancelled calls below
	// reach the reservation write without growing it.
	r, err := c.Reserve(ctx, b, 1000, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Release(ctx, b.Id, r.ID); err != nil {
		t.Fatal(err)
	}
	gone, stop := context.WithCancel(ctx)
	stop()
	for range 40 {
		if r, err := c.Reserve(gone, b, 10, time.Second); err == nil {
			t.Logf("a cancelled call still got %s, which lapses with its TTL", r.ID)
		}
	}
	poll(t, 10*time.Second, "the whole bucket to be reservable again", func() bool {
		r, err := c.Reserve(ctx, b, 1000, time.Second)
		if err != nil {
			return false
		}
		return c.Release(ctx, b.Id, r.ID) == nil
	})
}

// An operator who lowers a bucket's limit, or corrects its usage upward,
// stops new reservations at the room left: a block a replica took before
// gives back what no reservation uses, instead of being carved past the
// limit. Reservations granted before still commit.
func TestBlocksShrinkToTheRoomLeft(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(ctx context.Context, l *ledger.Ledger, bk *adminv1.BucketSpec) (limit int64)
	}{
		{"limit lowered", func(_ context.Context, _ *ledger.Ledger, bk *adminv1.BucketSpec) int64 {
			bk.MonthlyLimitBytes = 10_000
			return bk.MonthlyLimitBytes
		}},
		{"usage corrected", func(ctx context.Context, l *ledger.Ledger, bk *adminv1.BucketSpec) int64 {
			if _, err := l.SetUsage(ctx, bk.GetId(), bk.GetMonthlyLimitBytes()-10_000+500); err != nil {
				t.Fatal(err)
			}
			return bk.GetMonthlyLimitBytes()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, cli := testenv.Etcd(t)
			l, a := replicaCap(t, cli, "a")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			bk := bucket("b1", 1<<20)
			first, err := a.Reserve(ctx, bk, 500, time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := a.Commit(ctx, bk, first.ID, 500, nil); err != nil {
				t.Fatal(err)
			}
			held, err := a.Reserve(ctx, bk, 2_000, time.Minute) // granted before the change
			if err != nil {
				t.Fatal(err)
			}
			limit := tc.change(ctx, l, bk)
			// 7,500 bytes are left. A usage correction reaches the replica
			// through a watch: until then its block may still be carved.
			poll(t, 10*time.Second, "a reservation beyond the room left to be refused", func() bool {
				r, err := a.Reserve(ctx, bk, 7_501, time.Minute)
				if err == nil {
					if err := a.Release(ctx, "b1", r.ID); err != nil {
						t.Fatal(err)
					}
					return false
				}
				if !errors.Is(err, ledger.ErrNoRoom) {
					t.Fatal(err)
				}
				return true
			})
			var granted int64
			for {
				if _, err := a.Reserve(ctx, bk, 1_000, time.Minute); errors.Is(err, ledger.ErrNoRoom) {
					break
				} else if err != nil {
					t.Fatal(err)
				}
				granted += 1_000
			}
			if granted != 7_000 {
				t.Fatalf("%d bytes granted after the change, want the 7,000 that fit in the 7,500 left", granted)
			}
			if _, err := a.Commit(ctx, bk, held.ID, 2_000, nil); err != nil {
				t.Fatalf("a reservation granted before the change: %v", err)
			}
			if u := usage(t, l, "b1"); u.Used+granted > limit {
				t.Fatalf("used %d + reserved %d > limit %d", u.Used, granted, limit)
			}
		})
	}
}

// Usage shards of other replicas that stay unchanged between two folds,
// and every shard of a past period, fold into the base usage key: every
// process start is a new replica with shards of its own, which must not
// pile up in etcd. Usage stays the same through a fold, and a live
// replica whose shard was folded commits on into a new one.
func TestIdleShardsFold(t *testing.T) {
	_, cli := testenv.Etcd(t)
	var now atomic.Int64
	now.Store(time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	la, a := replicaCapWith(t, cli, "a", ledger.Options{Now: clock})
	_, b := replicaCapWith(t, cli, "b", ledger.Options{Now: clock})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bk := bucket("b1", 1_000_000)
	commit := func(c *ledger.Capacity, n int64) {
		t.Helper()
		r, err := c.Reserve(ctx, bk, n, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Commit(ctx, bk, r.ID, n, nil); err != nil {
			t.Fatal(err)
		}
	}
	shards := func(period string) int {
		t.Helper()
		resp, err := cli.Get(ctx, "/bucketlb/ushard/"+period+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		return int(resp.Count)
	}
	commit(b, 300)
	commit(a, 200)
	if n := shards("2026-03"); n != 2 {
		t.Fatalf("%d shards, want one per replica", n)
	}
	if n, err := a.FoldShards(ctx); err != nil || n != 0 {
		t.Fatalf("first fold: %d folded (%v), want none: b's shard was just seen", n, err)
	}
	if n, err := a.FoldShards(ctx); err != nil || n != 1 {
		t.Fatalf("second fold: %d folded (%v), want b's idle shard", n, err)
	}
	if n := shards("2026-03"); n != 1 {
		t.Fatalf("%d shards after the fold, want a's alone", n)
	}
	if u := usage(t, la, "b1"); u.Used != 500 {
		t.Fatalf("used %d after the fold, want 500", u.Used)
	}
	commit(b, 50) // b's shard was folded under it
	if u := usage(t, la, "b1"); u.Used != 550 {
		t.Fatalf("used %d after b committed again, want 550", u.Used)
	}
	now.Store(time.Date(2026, 4, 2, 0, 0, 0, 0, time.UTC).UnixNano())
	if n, err := a.FoldShards(ctx); err != nil || n != 2 {
		t.Fatalf("fold after the period ended: %d folded (%v), want both of March's shards", n, err)
	}
	if n := shards("2026-03"); n != 0 {
		t.Fatalf("%d shards of a past period left", n)
	}
	resp, err := cli.Get(ctx, "/bucketlb/usage/2026-03/b1")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "550" {
		t.Fatalf("March's usage key %v (%v), want 550", resp.Kvs, err)
	}
}

// When live reservations already hold more than the room a lower limit
// leaves, bytes they free go back instead of being granted again: the
// bucket ends at its new limit, not over it.
func TestFreedBytesOverALowerLimitGoBack(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l, a := replicaCap(t, cli, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bk := bucket("b1", 1<<20)
	var held []*ledger.Reservation
	for range 8 {
		r, err := a.Reserve(ctx, bk, 1_000, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, r)
	}
	bk.MonthlyLimitBytes = 5_000 // 8,000 already held
	if _, err := a.Reserve(ctx, bk, 1, time.Minute); !errors.Is(err, ledger.ErrNoRoom) {
		t.Fatalf("reserve over a limit already held: %v, want ErrNoRoom", err)
	}
	for _, r := range held[5:] {
		if err := a.Release(ctx, "b1", r.ID); err != nil {
			t.Fatal(err)
		}
	}
	if r, err := a.Reserve(ctx, bk, 1_000, time.Minute); !errors.Is(err, ledger.ErrNoRoom) {
		t.Fatalf("freed bytes granted again over the limit: %v, %v", r, err)
	}
	for _, r := range held[:5] {
		if _, err := a.Commit(ctx, bk, r.ID, 1_000, nil); err != nil {
			t.Fatal(err)
		}
	}
	if u := usage(t, l, "b1"); u.Used != 5_000 {
		t.Fatalf("used %d, want the new limit, 5,000", u.Used)
	}
}
