package allocator_test

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/errinfo"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

// A Commit that must take its bytes from the granting replica's block
// (its own has no room), with etcd out of space, answers as one from its
// own block does: UNAVAILABLE "etcd is out of space", marked as applying
// nothing once the commit marker is read to be absent. Before, the
// refusal was retried 50 times into "too many concurrent updates",
// unmarked, and a keyed upload kept an uncounted object. Found by the
// third regression review.
func TestOwnerCommitOutOfSpace(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	srv, cli := testenv.EtcdWithQuota(t, 16<<20)
	cfg := func(id string) allocator.Config {
		return allocator.Config{Buckets: []*adminv1.BucketSpec{spec("p1", 1, 2000)}, Identity: id}
	}
	r1 := startReplica(t, testenv.EtcdClient(t, srv.Endpoint), cfg("r1"))
	r2 := startReplica(t, testenv.EtcdClient(t, srv.Endpoint), cfg("r2"))
	// r2 commits once (its marker and record leases are granted), then
	// its idle block goes back, so it has no room of its own.
	a, err := r2.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r2.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: "p1", ReservedBytes: a.GetReservedBytes(),
		Size: 10, Key: "first", Etag: `"e"`, IdempotencyKey: "first"}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		resp, err := cli.Get(ctx, "/bucketlb/cap/blocks/p1/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("idle blocks did not go back: %d left", len(resp.Kvs))
		}
	}
	res, err := r1.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1990})
	if err != nil {
		t.Fatal(err)
	}
	testenv.FillEtcd(ctx, t, cli)
	_, err = r2.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: res.GetReservationId(), BucketId: "p1", ReservedBytes: res.GetReservedBytes(),
		Size: 1990, Key: "second", Etag: `"e"`, IdempotencyKey: "second"})
	if !strings.Contains(status.Convert(err).Message(), "etcd is out of space") || !errinfo.Has(err, errinfo.NotApplied) {
		t.Fatalf("Commit from the owner's block with etcd out of space: %v, want UNAVAILABLE \"etcd is out of space\" marked NOT_APPLIED", err)
	}
	if _, err := r1.alloc.GetUploadRecord(ctx, &allocatorv1.GetUploadRecordRequest{IdempotencyKey: "second"}); err == nil {
		t.Fatal("a Commit answered as not applied left a record")
	}
}
