package uploader_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/etcdembed"
	"github.com/bucketlb/bucketlb/pkg/grpcserver"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// zzStartCrashingAllocator is startAllocator whose replica "crashes" (etcd
// client closed, gRPC server stopped) right after it APPLIED a Commit and
// before its answer leaves: the answer is lost, the commit is recorded.
func startCrashingAllocator(t *testing.T, st *stack, etcd *etcdembed.Server) (addr string, applied <-chan struct{}, crash func()) {
	t.Helper()
	cfg := allocator.Config{Buckets: st.Buckets, AdminToken: adminToken, ServiceToken: serviceToken, Identity: "replica-crashing"}
	cli := testenv.EtcdClient(t, etcd.Endpoint)
	ctx, cancel := context.WithCancel(context.Background())
	alloc, err := allocator.New(ctx, cli, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
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
	unary, streamI := alloc.Interceptors()
	srv := grpcserver.New(grpcserver.Options{Logger: slog.New(slog.DiscardHandler), DrainDelay: 300 * time.Millisecond, StopTimeout: 5 * time.Second,
		UnaryInterceptors: []grpc.UnaryServerInterceptor{hook, unary}, StreamInterceptors: []grpc.StreamServerInterceptor{streamI}})
	alloc.Register(srv.GRPC)
	srv.SetServing("bucketlb.allocator.v1.AllocatorService", "bucketlb.admin.v1.AdminService")
	done := make(chan struct{})
	go func() { defer close(done); _ = alloc.Serve(ctx, srv, lis) }()
	crash = sync.OnceFunc(func() { _ = cli.Close(); srv.GRPC.Stop(); cancel() })
	t.Cleanup(func() { crash(); <-done; _ = alloc.Close() })
	return lis.Addr().String(), ap, crash
}

// A Commit that APPLIED on replica A, whose answer was lost (A crashed),
// is retried by the connection's own retry policy (UNAVAILABLE) on
// replica B. B's answer is marked NOT_APPLIED, the upload service removes
// the object, and the idempotency record names an object that is gone.
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
				var err error
				etcd, err = etcdembed.Start(ctx, etcdembed.Options{Dir: t.TempDir(), LogLevel: "fatal", QuotaBytes: 16 << 20})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(etcd.Close)
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
				cli := testenv.EtcdClient(t, etcd.Endpoint)
				filler := strings.Repeat("x", 256<<10)
				for i := 0; ; i++ {
					_, err := cli.Put(ctx, fmt.Sprintf("/filler/%d", i), filler)
					if errors.Is(err, rpctypes.ErrNoSpace) {
						break
					}
					if err != nil || i > 200 {
						t.Fatalf("filling etcd, put %d: %v", i, err)
					}
				}
				t.Log("etcd is now out of space")
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
