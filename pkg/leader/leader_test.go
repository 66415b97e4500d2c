package leader_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bucketlb/bucketlb/pkg/leader"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

const electionKey = "/test/leader"

// candidate is one replica: its own etcd client, an elector with two jobs
// (a counter every 10 ms, and one that holds until its context ends).
type candidate struct {
	cli    *clientv3.Client
	el     *leader.Elector
	runs   atomic.Int64
	active atomic.Bool // the holding job is running
	cancel context.CancelFunc
	done   chan struct{}
}

func start(t *testing.T, endpoint string, n, ttl int) []*candidate {
	t.Helper()
	cs := make([]*candidate, n)
	for i := range cs {
		c := &candidate{cli: testenv.EtcdClient(t, endpoint), done: make(chan struct{})}
		c.el = leader.New(c.cli, electionKey, fmt.Sprint("r", i), ttl, []leader.Job{
			{Name: "count", Every: 10 * time.Millisecond, Run: func(context.Context) { c.runs.Add(1) }},
			{Name: "hold", Every: time.Hour, Run: func(ctx context.Context) {
				c.active.Store(true)
				<-ctx.Done()
				c.active.Store(false)
			}},
		}, nil)
		ctx, cancel := context.WithCancel(context.Background())
		c.cancel = cancel
		go func() { defer close(c.done); _ = c.el.Run(ctx) }()
		cs[i] = c
	}
	t.Cleanup(func() {
		for _, c := range cs {
			c.cancel()
		}
		for _, c := range cs {
			<-c.done
		}
	})
	return cs
}

// waitLeader polls until exactly one candidate other than skip leads,
// failing if two ever lead at once.
func waitLeader(t *testing.T, cs []*candidate, skip int, within time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		n, who := 0, -1
		for i, c := range cs {
			if i != skip && c.el.Leading() {
				n++
				who = i
			}
		}
		if n > 1 {
			t.Fatalf("%d leaders at once", n)
		}
		if n == 1 {
			return who
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no leader within %v", within)
	return -1
}

func waitUntil(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting until %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// jobsStopped checks that c's jobs stopped with its leadership: once
// Leading is false, no job runs and none starts again.
func jobsStopped(t *testing.T, c *candidate) {
	t.Helper()
	if c.active.Load() {
		t.Fatal("the holding job still runs after leadership ended")
	}
	before := c.runs.Load()
	time.Sleep(50 * time.Millisecond) // five job periods
	if after := c.runs.Load(); after != before {
		t.Fatalf("the old leader still runs its job (%d -> %d runs)", before, after)
	}
}

// Exactly one of three replicas runs the jobs; on shutdown it resigns, so
// another takes over well before the 10 s lease would expire.
func TestOneLeaderAndGracefulHandover(t *testing.T) {
	srv, _ := testenv.Etcd(t)
	cs := start(t, srv.Endpoint, 3, 10)
	first := waitLeader(t, cs, -1, 10*time.Second)
	waitUntil(t, "the leader runs its jobs", 5*time.Second, func() bool { return cs[first].runs.Load() >= 3 && cs[first].active.Load() })
	for i, c := range cs {
		if i != first && (c.runs.Load() != 0 || c.active.Load()) {
			t.Fatalf("follower %d ran the leader's jobs", i)
		}
	}
	assertLeader(t, cs[(first+1)%3], fmt.Sprint("r", first))
	t0 := time.Now()
	cs[first].cancel()
	<-cs[first].done
	second := waitLeader(t, cs, first, 3*time.Second)
	assertLeader(t, cs[first], fmt.Sprint("r", second))
	t.Logf("handover after resign took %v", time.Since(t0).Round(time.Millisecond))
	if cs[first].el.Leading() || cs[first].active.Load() {
		t.Fatal("the stopped replica still leads")
	}
	before := cs[second].runs.Load()
	waitUntil(t, "the new leader runs the job", 5*time.Second, func() bool { return cs[second].runs.Load() > before })
}

// A leader whose client dies (no resign, lease not revoked) stops acting
// at once, and another candidate takes over after the lease expires.
func TestFailoverWhenLeaderClientCloses(t *testing.T) {
	srv, _ := testenv.Etcd(t)
	cs := start(t, srv.Endpoint, 2, 2)
	first := waitLeader(t, cs, -1, 10*time.Second)
	waitUntil(t, "the leader runs its jobs", 5*time.Second, func() bool { return cs[first].active.Load() })
	t0 := time.Now()
	cs[first].cli.Close()
	waitUntil(t, "the dead leader stops leading", 5*time.Second, func() bool { return !cs[first].el.Leading() })
	jobsStopped(t, cs[first])
	second := waitLeader(t, cs, first, 10*time.Second)
	t.Logf("failover after client close took %v", time.Since(t0).Round(time.Millisecond))
	waitUntil(t, "the new leader runs its jobs", 5*time.Second, func() bool { return cs[second].active.Load() })
}

// When the leader's session is lost (its lease revoked behind its back),
// it stops acting at once; the election goes on and someone leads again.
func TestStopsActingWhenSessionLost(t *testing.T) {
	srv, admin := testenv.Etcd(t)
	cs := start(t, srv.Endpoint, 2, 2)
	first := waitLeader(t, cs, -1, 10*time.Second)
	waitUntil(t, "the leader runs its jobs", 5*time.Second, func() bool { return cs[first].active.Load() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := admin.Get(ctx, electionKey, clientv3.WithFirstCreate()...)
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("read the leader key: %v", err)
	}
	if _, err := admin.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the leader notices its lost session", 5*time.Second, func() bool { return !cs[first].el.Leading() })
	jobsStopped(t, cs[first])
	next := waitLeader(t, cs, -1, 10*time.Second)
	waitUntil(t, "the next leader runs its jobs", 5*time.Second, func() bool { return cs[next].active.Load() })
}

// assertLeader checks that c (any replica, even a stopped one) names want
// as the leader.
func assertLeader(t *testing.T, c *candidate, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if got, err := c.el.Leader(ctx); err != nil || got != want {
		t.Fatalf("Leader() = %q, %v; want %q", got, err, want)
	}
}
