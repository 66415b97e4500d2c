package leader_test

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/leader"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// Exactly one of three replicas runs the job; when it stops, another
// takes over.
func TestOneLeaderAndFailover(t *testing.T) {
	srv, _ := testenv.Etcd(t)
	var runs [3]atomic.Int64
	var electors [3]*leader.Elector
	var cancels [3]context.CancelFunc
	done := make(chan struct{}, 3)
	for i := range electors {
		cli := testenv.EtcdClient(t, srv.Endpoint)
		i := i
		electors[i] = leader.New(cli, "/test/leader", fmt.Sprint("r", i), 2, []leader.Job{{
			Name: "count", Every: 10 * time.Millisecond, Run: func(context.Context) { runs[i].Add(1) },
		}}, slog.New(slog.DiscardHandler))
		ctx, cancel := context.WithCancel(context.Background())
		cancels[i] = cancel
		go func() { electors[i].Run(ctx); done <- struct{}{} }()
	}
	t.Cleanup(func() {
		for _, c := range cancels {
			c()
		}
		for range cancels {
			<-done
		}
	})
	waitLeader := func(skip int) int {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			n, who := 0, -1
			for i, e := range electors {
				if i != skip && e.Leading() {
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
		t.Fatal("no leader elected")
		return -1
	}
	first := waitLeader(-1)
	deadline := time.Now().Add(5 * time.Second)
	for runs[first].Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatal("leader does not run its job")
		}
		time.Sleep(5 * time.Millisecond)
	}
	for i := range runs {
		if i != first && runs[i].Load() != 0 {
			t.Fatalf("follower %d ran the leader's job", i)
		}
	}
	cancels[first]()
	second := waitLeader(first)
	if second == first {
		t.Fatal("the stopped replica still leads")
	}
	before := runs[second].Load()
	deadline = time.Now().Add(5 * time.Second)
	for runs[second].Load() <= before {
		if time.Now().After(deadline) {
			t.Fatal("new leader does not run the job")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
