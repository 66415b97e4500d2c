package ledger

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// A Renew re-establishes a reservation the janitor expired, and its put
// applies but its answer is lost (revision unknown). The event of the
// earlier deletion, arriving late, must not drop the live reservation
// from the view: its bytes would be carved again, and committing both
// would take more than the bucket's limit. The late event is handed to
// apply directly, as a lagging watch would deliver it.
func TestLateDeletionKeepsTheReservationRenewed(t *testing.T) {
	srv, cli := testenv.Etcd(t)
	var loseNext atomic.Bool
	lossy, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			err := invoker(ctx, method, req, reply, cc, opts...)
			if tr, ok := req.(*etcdserverpb.TxnRequest); ok && err == nil && len(tr.Compare) == 0 &&
				strings.Contains(string(tr.Success[0].GetRequestPut().GetKey()), "/cap/res/") && loseNext.CompareAndSwap(true, false) {
				return status.Error(codes.Unavailable, "connection reset after the write applied")
			}
			return err
		})}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lossy.Close() })
	l := New(lossy, Options{})
	c := l.NewCapacity("a", 2*time.Second, slog.New(slog.DiscardHandler))
	rctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(rctx); close(done) }()
	t.Cleanup(func() { stop(); <-done })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bk := &adminv1.BucketSpec{Id: "b1", Name: "b1", Endpoint: "http://x", CredentialsRef: "R", MonthlyLimitBytes: 1000,
		State: adminv1.BucketState_BUCKET_STATE_ACTIVE}
	x, err := c.Reserve(ctx, bk, 600, time.Second) // its holder stops renewing
	if err != nil {
		t.Fatal(err)
	}
	// The janitor expires it; keep the deletion's event.
	var late *clientv3.Event
	for wr := range cli.Watch(ctx, l.resKey("b1", x.ID), clientv3.WithFilterPut()) {
		if len(wr.Events) > 0 {
			late = wr.Events[0]
			break
		}
	}
	if late == nil {
		t.Fatal("no deletion seen")
	}
	loseNext.Store(true)
	if _, _, err := c.Renew(ctx, bk, x.ID, 600, time.Minute); err == nil || loseNext.Load() {
		t.Fatalf("renew: %v; want the re-establishing put's answer lost", err)
	}
	if r, err := cli.Get(ctx, l.resKey("b1", x.ID)); err != nil || len(r.Kvs) != 1 {
		t.Fatalf("the re-established reservation is not in etcd (%v)", err)
	}
	tm, err := c.wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.apply(ctx, tm, []*clientv3.Event{late})
	if y, err := c.Reserve(ctx, bk, 600, time.Minute); !errors.Is(err, ErrNoRoom) {
		t.Fatalf("reserved %v (%v) while 600 of the bucket's 1000 bytes are held; want ErrNoRoom", y, err)
	}
}

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
