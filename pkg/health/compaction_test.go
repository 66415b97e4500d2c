package health

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// A watch that fell behind a compaction reports ErrCompacted (Run then
// re-reads at once), and Run's cache converges on the current records.
func TestWatchAfterCompaction(t *testing.T) {
	_, cli := testenv.Etcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w := NewStore(cli, "", nil, Policy{FlushEvery: -1, FailureThreshold: 100}) // no cooldown: every failure counts
	for i := 0; i < 4; i++ {
		if _, err := w.Report(ctx, "x", false, 0); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := cli.Get(ctx, "/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	s := NewStore(cli, "", nil, Policy{})
	err = s.watch(ctx, 2)
	if !errors.Is(err, rpctypes.ErrCompacted) {
		t.Fatalf("watch below the compacted revision: %v, want ErrCompacted", err)
	}
	rctx, rcancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Run(rctx) }()
	defer func() { rcancel(); <-done }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if r, ok := s.Cached("x"); ok && r.Failures == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("cache never loaded the record after compaction")
		}
		time.Sleep(2 * time.Millisecond)
	}
	if _, err := w.Report(ctx, "x", false, 0); err != nil {
		t.Fatal(err)
	}
	for {
		if r, _ := s.Cached("x"); r.Failures == 5 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("cache does not follow changes after compaction")
		}
		time.Sleep(2 * time.Millisecond)
	}
}
