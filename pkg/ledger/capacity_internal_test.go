package ledger

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// A reservation put under a lease etcd no longer has (a late write of an
// ended term) makes etcd refuse its whole transaction. The other writes
// batched with it go again alone and land; the refused one is reported
// as not applied, so its bytes go back at once instead of being held as
// an unknown outcome.
func TestRefusedBatchRetriesEachWrite(t *testing.T) {
	_, cli := testenv.Etcd(t)
	c := New(cli, Options{}).NewCapacity("a", 2*time.Second, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	gone, err := cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Revoke(ctx, gone.ID); err != nil {
		t.Fatal(err)
	}
	late := &write{op: clientv3.OpPut("/test/late", "x", clientv3.WithLease(gone.ID)), done: make(chan writeResult, 1)}
	live := &write{op: clientv3.OpPut("/test/live", "y"), done: make(chan writeResult, 1)}
	c.writes <- late // queued before the writer runs: one batch
	c.writes <- live
	go c.writer(ctx)
	if r := <-late.done; !errors.Is(r.err, errNotApplied) {
		t.Fatalf("put under a revoked lease: %v, want errNotApplied", r.err)
	}
	if r := <-live.done; r.err != nil || r.rev == 0 {
		t.Fatalf("put batched with it: rev %d, %v; want it applied", r.rev, r.err)
	}
	if got, err := cli.Get(ctx, "/test/live"); err != nil || len(got.Kvs) != 1 {
		t.Fatalf("the live put is not in etcd (%v)", err)
	}
}
