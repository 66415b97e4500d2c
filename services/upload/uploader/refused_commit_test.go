package uploader_test

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// dialAllocator is the upload service's connection to one allocator
// replica, as in production.
func dialAllocator(t testing.TB, addr string) allocatorv1.AllocatorServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, append(uploader.AllocatorDialOptions(serviceToken), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return allocatorv1.NewAllocatorServiceClient(conn)
}

// A keyed upload whose Commit etcd refuses for lack of space (nothing
// applied) removes its object: it is no lost answer, after which the
// object would stay for a retry. Before, it stayed uncounted, and the
// retry the client was told to make, once etcd had room, stored a second
// object: two in the bucket, one counted.
func TestCommitRefusedForSpaceRemovesTheObject(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	st, _ := newStack(t, []string{testenv.S3(t).Endpoint})
	etcd, cli := testenv.EtcdWithQuota(t, 16<<20)
	st.Etcd = etcd
	r := st.startAllocator(t, etcd, nil)
	hp := hold(singlePut)
	st.startUpload(t, dialAllocator(t, r.Addr), func(c *uploader.Config) { c.HTTPClient = hp })
	bucket := st.Buckets[0].GetId()
	data := testenv.OpaqueBytes(t, 4096)
	hdr := &uploadv1.UploadHeader{NameHint: "nospace.bin", ContentType: "application/octet-stream", Size: int64(len(data)), IdempotencyKey: "nospace-key"}
	done := sendInBackground(ctx, st.Upload, hdr, data)
	<-hp.started // reserved and claimed: the PUT is on its way
	testenv.FillEtcd(ctx, t, cli)
	close(hp.release)
	err := <-done
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "so it was removed") {
		t.Fatalf("upload whose Commit etcd refused: %v, want Unavailable saying the object was removed", err)
	}
	if objects, _ := st.objects(t); objects[st.Buckets[0].GetName()] != 0 {
		t.Fatalf("%d objects left after a Commit that applied nothing", objects[st.Buckets[0].GetName()])
	}
	// The operator frees etcd; the client retries under its key.
	if _, err := cli.Delete(ctx, "/filler/", clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	g, err := cli.Get(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, g.Header.Revision); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Defragment(ctx, etcd.Endpoint); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.AlarmDisarm(ctx, &clientv3.AlarmMember{}); err != nil {
		t.Fatal(err)
	}
	if _, err := send(ctx, st.Upload, hdr, data); err != nil {
		t.Fatalf("retry once etcd has room: %v", err)
	}
	objects, _ := st.objects(t)
	if used, _ := st.usage(t); objects[st.Buckets[0].GetName()] != 1 || used[bucket] != int64(len(data)) {
		t.Fatalf("after the retry: %d objects, %d bytes used; want one object of %d bytes, counted", objects[st.Buckets[0].GetName()], used[bucket], len(data))
	}
}

// commitElsewhere sends Commit to another allocator replica, every other
// call to the first.
type commitElsewhere struct {
	uploader.Allocator
	other allocatorv1.AllocatorServiceClient
}

func (c commitElsewhere) Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error) {
	return c.other.Commit(ctx, in, opts...)
}

// During a rotation of the service token, a keyed upload's Commit may
// reach a replica that refuses the upload service's token: nothing
// applied, so the object is removed, not kept uncounted.
func TestCommitRefusedForTheTokenRemovesTheObject(t *testing.T) {
	st, etcd := newStack(t, []string{testenv.S3(t).Endpoint})
	r1 := st.startAllocator(t, etcd, nil)
	r2 := st.startAllocator(t, etcd, func(c *allocator.Config) { c.ServiceToken = "rotated-token" })
	st.startUpload(t, commitElsewhere{Allocator: dialAllocator(t, r1.Addr), other: dialAllocator(t, r2.Addr)}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 4096)
	_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "tok.bin", ContentType: "application/octet-stream", Size: int64(len(data)), IdempotencyKey: "tok-key"}, data)
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "service token") {
		t.Fatalf("upload whose Commit was refused for the token: %v, want Unavailable naming the service token", err)
	}
	name := st.Buckets[0].GetName()
	if objects, _ := st.objects(t); objects[name] != 0 {
		t.Fatalf("%d objects left after a Commit refused for its token", objects[name])
	}
	st.waitNoReservations(t)
	if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != 0 {
		t.Fatalf("used %v, want nothing", used)
	}
}
