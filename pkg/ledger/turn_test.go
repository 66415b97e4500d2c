package ledger_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// settableClock is a replica's wall clock, set by the test.
type settableClock struct{ ns atomic.Int64 }

func clockAt(t time.Time) *settableClock {
	c := &settableClock{}
	c.set(t)
	return c
}

func (c *settableClock) set(t time.Time) { c.ns.Store(t.UnixNano()) }
func (c *settableClock) now() time.Time  { return time.Unix(0, c.ns.Load()).UTC() }

// aprilAt is a time on the night March turns into April 2026.
func aprilAt(hour, minute, second int) time.Time {
	if hour == 0 {
		return time.Date(2026, 4, 1, 0, minute, second, 0, time.UTC)
	}
	return time.Date(2026, 3, 31, hour, minute, second, 0, time.UTC)
}

// skewedPair starts two replicas on one etcd, a on the clock ahead and b
// on the one behind, both set by the test.
func skewedPair(t *testing.T, aheadAt, behindAt time.Time) (l *ledger.Ledger, a, b *ledger.Capacity, behind *settableClock) {
	t.Helper()
	_, cli := testenv.Etcd(t)
	ahead := clockAt(aheadAt)
	behind = clockAt(behindAt)
	l, a = replicaCapWith(t, cli, "a", ledger.Options{Now: ahead.now})
	_, b = replicaCapWith(t, cli, "b", ledger.Options{Now: behind.now})
	return l, a, b, behind
}

// Replicas whose clocks straddle the turn of a month (by less than a
// minute) keep both months within the limit. Before, a replica already in
// April granted April's room, and a replica still in March committed those
// bytes into a full March: 2,000 bytes in March on a 1,000-byte bucket,
// and April then granted its 1,000 again.
func TestSkewedClocksAtTheTurnKeepBothMonthsWithinTheLimit(t *testing.T) {
	l, a, b, behind := skewedPair(t, aprilAt(0, 0, 1), aprilAt(23, 57, 0))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bk := bucket("b1", 1000)
	take := func(c *ledger.Capacity, n int64) (*ledger.Reservation, error) {
		return c.Reserve(ctx, bk, n, time.Minute)
	}
	commit := func(c *ledger.Capacity, r *ledger.Reservation) {
		t.Helper()
		if _, err := c.Commit(ctx, bk, r.ID, r.Size, nil); err != nil {
			t.Fatal(err)
		}
	}
	used := func(period string) int64 {
		t.Helper()
		n, err := l.UsedIn(ctx, period, "b1")
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	// March fills up through b, well before its end.
	r, err := take(b, 1000)
	if err != nil {
		t.Fatal(err)
	}
	commit(b, r)
	// b's clock is now 31 s behind a's, which is in April.
	behind.set(aprilAt(23, 59, 30))
	r, err = take(a, 1000)
	if err != nil {
		t.Fatalf("April's room on the replica in April: %v", err)
	}
	commit(b, r) // the upload's Commit reaches the replica still in March
	if m, ap := used("2026-03"), used("2026-04"); m != 1000 || ap != 1000 {
		t.Fatalf("used %d in March and %d in April, want 1000 in each: the bytes April granted count in April", m, ap)
	}
	if _, err := take(a, 1); !errors.Is(err, ledger.ErrNoRoom) {
		t.Fatalf("April, full, granted more: %v", err)
	}
}

// The other way round: a replica still in March's last minute grows its
// block within the room April has left, since what it carves is committed
// into April. Before, it took March's room alone, and after its own turn
// it committed what it had carved into April, 800 bytes over the limit.
func TestAGrowBeforeTheTurnLeavesTheNextMonthsRoom(t *testing.T) {
	l, a, b, behind := skewedPair(t, aprilAt(0, 0, 10), aprilAt(23, 59, 20))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bk := bucket("b1", 1000)
	r, err := a.Reserve(ctx, bk, 800, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := a.Commit(ctx, bk, r.ID, 800, nil); err != nil || res.Period != "2026-04" {
		t.Fatalf("commit in April: %+v %v", res, err)
	}
	// b, 50 s behind, is in March's last minute, where March has all its
	// room and April 200 bytes.
	var granted []*ledger.Reservation
	for _, n := range []int64{1000, 200} {
		r, err := b.Reserve(ctx, bk, n, time.Minute)
		switch {
		case err == nil:
			granted = append(granted, r)
		case !errors.Is(err, ledger.ErrNoRoom):
			t.Fatal(err)
		}
	}
	behind.set(aprilAt(0, 0, 30))
	for _, r := range granted {
		if _, err := b.Commit(ctx, bk, r.ID, r.Size, nil); err != nil {
			t.Fatal(err)
		}
	}
	for p, want := range map[string]int64{"2026-03": 0, "2026-04": 1000} {
		if n, err := l.UsedIn(ctx, p, "b1"); err != nil || n != want {
			t.Fatalf("%s used %d bytes (%v) on a 1,000-byte bucket, want %d", p, n, err, want)
		}
	}
}

// The ledger turns a minute early: commits in a period's last minute
// count in the next (see the tests above), and so do usage, status and
// corrections; a commit retried later still answers with its period.
func TestCommitsInAPeriodsLastMinuteCountInTheNext(t *testing.T) {
	_, cli := testenv.Etcd(t)
	clock := clockAt(aprilAt(23, 58, 59))
	l, c := replicaCapWith(t, cli, "a", ledger.Options{Now: clock.now})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bk := bucket("b1", 1000)
	for _, step := range []struct {
		at   time.Time
		want string
	}{{aprilAt(23, 58, 59), "2026-03"}, {aprilAt(23, 59, 0), "2026-04"}, {aprilAt(0, 0, 0), "2026-04"}} {
		clock.set(step.at)
		r, err := c.Reserve(ctx, bk, 100, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		res, err := c.Commit(ctx, bk, r.ID, 100, nil)
		if err != nil || res.Period != step.want {
			t.Fatalf("commit at %s: %+v %v, want it counted in %s", step.at.Format(time.TimeOnly), res, err, step.want)
		}
		clock.set(aprilAt(0, 30, 0))
		again, err := c.Commit(ctx, bk, r.ID, 100, nil)
		if err != nil || !again.AlreadyCommitted || again.Period != step.want {
			t.Fatalf("commit at %s retried later: %+v %v, want it answered with %s", step.at.Format(time.TimeOnly), again, err, step.want)
		}
	}
	// In the last minute, usage, status and corrections are of the period
	// commits count in.
	clock.set(aprilAt(23, 59, 30))
	if u, p, err := l.Usages(ctx); err != nil || p.Name != "2026-04" || u["b1"].Used != 200 {
		t.Fatalf("usage in March's last minute: %v in %s (%v), want April's 200 bytes", u["b1"], p.Name, err)
	}
	if prev, err := l.SetUsage(ctx, "b1", 0); err != nil || prev != 200 {
		t.Fatalf("usage corrected in March's last minute: previous %d (%v), want April's 200", prev, err)
	}
}
