package uploader_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/etcdembed"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// zzStartCrashingAllocator is startAllocator whose replica "crashes" (etcd
// client closed, gRPC server stopped) right after it APPLIED a Commit and
// before its answer leaves: the answer is lost, the commit is recorded.
func startCrashingAllocator(t *testing.T, st *stack, etcd *etcdembed.Server) (addr string, applied <-chan struct{}, crash func()) {
	t.Helper()
	ap := make(chan struct{})
	var once sync.Once
	hook := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		if err == nil && strings.HasSuffix(info.FullMethod, "/Commit") {
			once.Do(func() { close(ap) })
			<-ctx.Done() // the process dies before the answer is written
			return nil, status.Error(codes.Unavailable, "crashed")
		}
		return resp, err
	}
	r := st.startAllocatorWith(t, etcd, nil, hook)
	return r.Addr, ap, r.Crash
}

// A Commit that applied on a replica that died before answering is tried
// again by gRPC on another replica, out of the upload service's sight. The
// second attempt is refused (the replica has a rotated service token, or
// etcd is out of space): that refusal must not be taken as "nothing
// applied", or the object would be removed while its bytes are counted
// and its idempotency record names it. Found by the regression review.
func TestLostCommitAnswerThenARefusal(t *testing.T) {
	for _, variant := range []string{"token", "nospace"} {
		t.Run(variant, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			st, etcd := newStack(t, []string{testenv.S3(t).Endpoint})
			if variant == "nospace" {
				etcd, _ = testenv.EtcdWithQuota(t, 16<<20)
				st.Etcd = etcd
			}
			bToken := serviceToken
			rB := st.startAllocator(t, etcd, func(c *allocator.Config) {
				if variant == "token" {
					c.ServiceToken = "rotated-token" // mid-rotation: B already has the new token
					bToken = c.ServiceToken
				}
			})
			aAddr, applied, crashA := startCrashingAllocator(t, st, etcd)

			// The upload service's connection, as in production: one
			// client, round robin over the replicas' addresses.
			res := manual.NewBuilderWithScheme("zz")
			res.InitialState(resolver.State{Addresses: []resolver.Address{{Addr: aAddr}}})
			aconn, err := grpc.NewClient(res.Scheme()+":///allocator", append(uploader.AllocatorDialOptions(serviceToken),
				grpc.WithResolvers(res), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = aconn.Close() })
			st.startUpload(t, allocatorv1.NewAllocatorServiceClient(aconn), nil)

			data := testenv.OpaqueBytes(t, 4096)
			hdr := &uploadv1.UploadHeader{NameHint: "lost.bin", ContentType: "application/octet-stream", IdempotencyKey: "lost-" + variant}
			done := sendInBackground(ctx, st.Upload, hdr, data)
			select {
			case <-applied:
			case err := <-done:
				t.Fatalf("upload ended before the Commit applied: %v", err)
			}
			t.Log("replica A applied the Commit; its answer is not sent")
			if variant == "nospace" {
				testenv.FillEtcd(ctx, t, testenv.EtcdClient(t, etcd.Endpoint))
			}
			// A's pod goes away: the endpoints list B only, and A's death
			// ends the call in flight to it. gRPC tries it again, on B
			// once its picker has B (at worst the upload service's own
			// next try gets there: the outcome must be the same).
			res.UpdateState(resolver.State{Addresses: []resolver.Address{{Addr: rB.Addr}}})
			crashA()
			err = <-done

			// What is recorded: read with a connection B accepts.
			bconn, err2 := grpc.NewClient(rB.Addr, append(uploader.AllocatorDialOptions(bToken), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
			if err2 != nil {
				t.Fatal(err2)
			}
			defer bconn.Close()
			rec, rerr := allocatorv1.NewAllocatorServiceClient(bconn).GetUploadRecord(ctx, &allocatorv1.GetUploadRecordRequest{IdempotencyKey: hdr.GetIdempotencyKey()})
			if rerr != nil {
				t.Fatalf("the record of the Commit A applied: %v", rerr)
			}
			if _, herr := st.S3.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(rec.GetRecord().GetBucketName()), Key: aws.String(rec.GetRecord().GetKey())}); herr != nil {
				t.Fatalf("the Commit applied (record %s) but the object is gone: %v; the client was told: %v", rec.GetRecord().GetKey(), herr, err)
			}
			if err != nil && (status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "retry with the same idempotency key")) {
				t.Fatalf("upload answered %v, want success or UNAVAILABLE asking for a retry under the key", err)
			}
			if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != int64(len(data)) {
				t.Fatalf("used %d, want %d", used[st.Buckets[0].GetId()], len(data))
			}
		})
	}
}

// gRPC's retry policy does not retry Commit: the upload service tries it
// again itself, and must see every try's answer. A try whose answer was
// lost (it may yet apply) hidden by gRPC, followed by another replica's
// refusal, had the upload service remove an object that then counted
// (found by the fourth regression review). Other calls are still retried
// on UNAVAILABLE.
func TestCommitIsNotRetriedByGRPC(t *testing.T) {
	st, etcd := newStack(t, []string{testenv.S3(t).Endpoint})
	var commits, allocates atomic.Int32
	hook := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		switch {
		case strings.HasSuffix(info.FullMethod, "/Commit") && commits.Add(1) == 1,
			strings.HasSuffix(info.FullMethod, "/Allocate") && allocates.Add(1) == 1:
			return nil, status.Error(codes.Unavailable, "the answer is lost")
		}
		return handler(ctx, req)
	}
	r := st.startAllocatorWith(t, etcd, nil, hook)
	alloc := dialAllocator(t, r.Addr)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, err := alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 10})
	if err != nil || allocates.Load() != 2 {
		t.Fatalf("Allocate after one lost answer: %v after %d attempts, want it retried once and granted", err, allocates.Load())
	}
	_, err = alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId(), ReservedBytes: 10, Size: 10, Key: "k", Etag: `"e"`})
	if status.Code(err) != codes.Unavailable || commits.Load() != 1 {
		t.Fatalf("Commit after one lost answer: %v after %d attempts, want UNAVAILABLE after one", err, commits.Load())
	}
}
