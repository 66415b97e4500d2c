package uploader_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/etcdembed"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/grpcserver"
	"github.com/bucketlb/bucketlb/pkg/mimecheck"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

const (
	adminToken   = "test-admin-token"
	serviceToken = "test-service-token"
)

// stack is an allocator (on a fresh embedded etcd) and an upload service,
// each on its own real gRPC server on 127.0.0.1:0, over the process-wide
// S3 gateway with one fresh bucket per entry, each behind a fault proxy.
type stack struct {
	Upload     uploadv1.UploadServiceClient
	UploadAddr string // host:port of the upload service
	// AllocatorAddr is host:port of the allocator.
	AllocatorAddr string
	Admin         adminv1.AdminServiceClient
	S3            *s3.Client
	Buckets       []*adminv1.BucketSpec
	Proxies       map[string]*faultproxy.Proxy
	Server        *uploader.Server
	// Replicas are the allocator replicas, in start order.
	Replicas []*allocReplica
	Etcd     *etcdembed.Server
	// Logs is what the upload service logged, as JSON lines.
	Logs *testenv.LogBuffer
}

func serve(t testing.TB, register func(grpc.ServiceRegistrar), opts ...grpc.ServerOption) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	register(srv)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// startStack starts buckets with priorities 1..n (the first is preferred)
// and lets tune adjust the upload config.
func startStack(t testing.TB, n int, tune func(*uploader.Config)) *stack {
	t.Helper()
	g := testenv.S3(t)
	var endpoints []string
	for i := 0; i < n; i++ {
		endpoints = append(endpoints, g.Endpoint)
	}
	return startStackAt(t, endpoints, nil, tune)
}

// startStackAt is startStack with each bucket's upstream endpoint given
// (the gateway, or a sink for benchmarks); tuneAlloc, if set, adjusts the
// allocator's config.
func startStackAt(t testing.TB, endpoints []string, tuneAlloc func(*allocator.Config), tune func(*uploader.Config)) *stack {
	return startStackWrapped(t, endpoints, tuneAlloc, tune, nil)
}

// startStackWrapped is startStackAt with the upload service's allocator
// client passed through wrap (when set), e.g. to hold a call's answer back,
// and extra options for the upload service's gRPC server.
func startStackWrapped(t testing.TB, endpoints []string, tuneAlloc func(*allocator.Config), tune func(*uploader.Config),
	wrap func(uploader.Allocator) uploader.Allocator, uploadOpts ...grpc.ServerOption) *stack {
	t.Helper()
	st, etcd := newStack(t, endpoints)
	r := st.startAllocator(t, etcd, tuneAlloc)
	aconn, err := grpc.NewClient(r.Addr, append(uploader.AllocatorDialOptions(serviceToken),
		grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = aconn.Close() })
	var client uploader.Allocator = allocatorv1.NewAllocatorServiceClient(aconn)
	if wrap != nil {
		client = wrap(client)
	}
	st.startUpload(t, client, tune, uploadOpts...)
	return st
}

// startReplicatedStack is startStackAt with n allocator replicas on one
// etcd. The upload service reaches them as in production: one client
// balancing calls round robin over every replica's address.
func startReplicatedStack(t testing.TB, endpoints []string, n int, tuneAlloc func(*allocator.Config), tune func(*uploader.Config)) *stack {
	t.Helper()
	return startReplicatedStackWith(t, endpoints, n, tuneAlloc, tune, uploader.AllocatorServiceConfig)
}

// startReplicatedStackWith is startReplicatedStack with the connection's
// service config.
func startReplicatedStackWith(t testing.TB, endpoints []string, n int, tuneAlloc func(*allocator.Config), tune func(*uploader.Config), serviceConfig string) *stack {
	t.Helper()
	st, etcd := newStack(t, endpoints)
	res := manual.NewBuilderWithScheme("replicas")
	var addrs []resolver.Address
	for i := 0; i < n; i++ {
		addrs = append(addrs, resolver.Address{Addr: st.startAllocator(t, etcd, tuneAlloc).Addr})
	}
	res.InitialState(resolver.State{Addresses: addrs})
	aconn, err := grpc.NewClient(res.Scheme()+":///allocator", append(uploader.AllocatorDialOptions(serviceToken),
		grpc.WithResolvers(res), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(serviceConfig))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = aconn.Close() })
	// Any live replica answers an operator, whose calls carry the admin
	// token instead of the service token.
	adminConn, err := grpc.NewClient(res.Scheme()+":///allocator", grpc.WithResolvers(res),
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultServiceConfig(serviceConfig))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = adminConn.Close() })
	st.Admin = adminv1.NewAdminServiceClient(adminConn)
	st.startUpload(t, allocatorv1.NewAllocatorServiceClient(aconn), tune)
	return st
}

// newTelemetry starts a telemetry instance with its own registry, for a
// test that reads the metrics a service records.
func newTelemetry(t testing.TB, service string) *telemetry.Telemetry {
	t.Helper()
	tel, err := telemetry.New(context.Background(), telemetry.Options{ServiceName: service})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tel.Shutdown(context.Background()) })
	return tel
}

// newStack creates one bucket per endpoint on the process-wide gateway,
// each behind a fault proxy, and a fresh embedded etcd.
func newStack(t testing.TB, endpoints []string) (*stack, *etcdembed.Server) {
	t.Helper()
	g := testenv.S3(t)
	etcd, _ := testenv.Etcd(t)
	st := &stack{Proxies: map[string]*faultproxy.Proxy{}, Etcd: etcd}
	for i, upstream := range endpoints {
		name := testenv.NewBucket(t, g)
		p, err := faultproxy.New(upstream)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		st.Proxies[name] = p
		st.Buckets = append(st.Buckets, &adminv1.BucketSpec{
			Id: name, Name: name, Endpoint: p.URL(), Region: g.Region, CredentialsRef: "GW",
			MonthlyLimitBytes: 1 << 40, Priority: int32(i + 1), Weight: 1,
			State: adminv1.BucketState_BUCKET_STATE_ACTIVE, PathStyle: true,
		})
	}
	var err error
	if st.S3, err = g.Client(); err != nil {
		t.Fatal(err)
	}
	return st, etcd
}

// allocReplica is one running allocator replica.
type allocReplica struct {
	Addr string // host:port of its gRPC server
	// ID is the replica's identity, which leads its reservation ids.
	ID string
	// Crash stops the replica as a dying process would: its etcd client
	// goes first, so no lease revoke reaches etcd and its capacity has to
	// expire, then its gRPC server drops every connection.
	Crash func()
	// Stop stops the replica as its main does on SIGTERM (health
	// NOT_SERVING, a drain delay, a graceful stop) and returns when it
	// has.
	Stop func()
}

// startAllocator runs one more allocator replica over st's buckets, with
// its own etcd client. The first replica started also serves st.Admin,
// unless the caller sets it.
func (st *stack) startAllocator(t testing.TB, etcd *etcdembed.Server, tune func(*allocator.Config)) *allocReplica {
	t.Helper()
	return st.startAllocatorWith(t, etcd, tune, nil)
}

// startAllocatorWith is startAllocator with hook (when set) first among
// the replica's unary interceptors, e.g. to lose an answer.
func (st *stack) startAllocatorWith(t testing.TB, etcd *etcdembed.Server, tune func(*allocator.Config), hook grpc.UnaryServerInterceptor) *allocReplica {
	t.Helper()
	r := &allocReplica{ID: fmt.Sprintf("replica-%d", len(st.Replicas))}
	cfg := allocator.Config{Buckets: st.Buckets, AdminToken: adminToken, ServiceToken: serviceToken, Identity: r.ID}
	if tune != nil {
		tune(&cfg)
	}
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
	unary, streamI := alloc.Interceptors()
	unaries := []grpc.UnaryServerInterceptor{unary}
	if hook != nil {
		unaries = append([]grpc.UnaryServerInterceptor{hook}, unaries...)
	}
	srv := grpcserver.New(grpcserver.Options{Logger: slog.New(slog.DiscardHandler), DrainDelay: 300 * time.Millisecond, StopTimeout: 5 * time.Second,
		UnaryInterceptors: unaries, StreamInterceptors: []grpc.StreamServerInterceptor{streamI}})
	alloc.Register(srv.GRPC)
	srv.SetServing("bucketlb.allocator.v1.AllocatorService", "bucketlb.admin.v1.AdminService")
	done := make(chan struct{})
	go func() { defer close(done); _ = alloc.Serve(ctx, srv, lis) }()
	r.Addr = lis.Addr().String()
	r.Crash = sync.OnceFunc(func() {
		_ = cli.Close()
		srv.GRPC.Stop()
		cancel()
	})
	r.Stop = func() { cancel(); <-done }
	t.Cleanup(func() { r.Crash(); <-done; _ = alloc.Close() })
	if st.Admin == nil {
		conn, err := grpc.NewClient(r.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		st.Admin, st.AllocatorAddr = adminv1.NewAdminServiceClient(conn), r.Addr
	}
	st.Replicas = append(st.Replicas, r)
	return r
}

// streamEnded returns a server option, and a channel it closes once the
// server has seen a stream's context end (its client gone): a test then
// knows when to let a held answer go.
func streamEnded() (grpc.ServerOption, <-chan struct{}) {
	ended := make(chan struct{})
	var once sync.Once
	return grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		go func() {
			<-ss.Context().Done()
			once.Do(func() { close(ended) })
		}()
		return h(srv, ss)
	}), ended
}

// startUpload runs the upload service over client.
func (st *stack) startUpload(t testing.TB, client uploader.Allocator, tune func(*uploader.Config), opts ...grpc.ServerOption) {
	t.Helper()
	g := testenv.S3(t)
	cfg := uploader.Config{
		Credentials:         objstore.StaticCredentials{"GW": {g.AccessKey, g.SecretKey}},
		AllowedContentTypes: append([]string{"application/octet-stream"}, mimecheck.DefaultAllowed...),
		BackoffBase:         time.Millisecond,
	}
	if tune != nil {
		tune(&cfg)
	}
	st.Logs = &testenv.LogBuffer{}
	up, err := uploader.New(cfg, client, slog.New(slog.NewJSONHandler(st.Logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = up.Close() })
	st.Server = up
	uconn := serve(t, up.Register, append(up.ServerOptions(), opts...)...)
	st.Upload, st.UploadAddr = uploadv1.NewUploadServiceClient(uconn), uconn.Target()
}

func (st *stack) adminCtx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+adminToken)
}

// usage returns used and reserved bytes per bucket id.
func (st *stack) usage(t testing.TB) (used, reserved map[string]int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	used, reserved, err := st.status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return used, reserved
}

// status is usage without failing the test, for goroutines.
func (st *stack) status(ctx context.Context) (used, reserved map[string]int64, err error) {
	rows, err := st.bucketStatus(ctx)
	if err != nil {
		return nil, nil, err
	}
	used, reserved = map[string]int64{}, map[string]int64{}
	for id, b := range rows {
		used[id], reserved[id] = b.GetUsedBytes(), b.GetReservedBytes()
	}
	return used, reserved, nil
}

// bucketStatus returns the admin status rows by bucket id.
func (st *stack) bucketStatus(ctx context.Context) (map[string]*adminv1.BucketStatus, error) {
	resp, err := st.Admin.GetStatus(st.adminCtx(ctx), &adminv1.GetStatusRequest{})
	if err != nil {
		return nil, err
	}
	rows := map[string]*adminv1.BucketStatus{}
	for _, b := range resp.GetBuckets() {
		rows[b.GetBucket().GetId()] = b
	}
	return rows, nil
}

// objects counts objects and open multipart uploads per bucket.
func (st *stack) objects(t testing.TB) (objects, multiparts map[string]int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	objects, multiparts = map[string]int{}, map[string]int{}
	for _, b := range st.Buckets {
		out, err := st.S3.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: aws.String(b.GetName())})
		if err != nil {
			t.Fatalf("list %s: %v", b.GetName(), err)
		}
		objects[b.GetId()] = len(out.Contents)
		mp, err := st.S3.ListMultipartUploads(ctx, &s3.ListMultipartUploadsInput{Bucket: aws.String(b.GetName())})
		if err != nil {
			t.Fatalf("list multipart %s: %v", b.GetName(), err)
		}
		multiparts[b.GetId()] = len(mp.Uploads)
	}
	return objects, multiparts
}

// waitNoReservations polls until every reservation is gone.
func (st *stack) waitNoReservations(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, reserved := st.usage(t)
		total := int64(0)
		for _, r := range reserved {
			total += r
		}
		if total == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("reservations left: %v", reserved)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// send streams one upload in 1 MiB chunks.
func send(ctx context.Context, c uploadv1.UploadServiceClient, hdr *uploadv1.UploadHeader, data []byte) (*uploadv1.UploadResponse, error) {
	return uploadclient.Upload(ctx, c, hdr, bytes.NewReader(data), uploadclient.Options{ChunkSize: 1 << 20})
}

// sendInBackground starts an upload of data under hdr (its size set from
// data) and returns the channel its outcome arrives on.
func sendInBackground(ctx context.Context, c uploadv1.UploadServiceClient, hdr *uploadv1.UploadHeader, data []byte) <-chan error {
	hdr.Size = int64(len(data))
	done := make(chan error, 1)
	go func() {
		_, err := send(ctx, c, hdr, data)
		done <- err
	}()
	return done
}

// uploadInBackground starts an upload of what body reads, in 1 MiB
// chunks, and returns the channel its outcome arrives on.
func uploadInBackground(ctx context.Context, c uploadv1.UploadServiceClient, hdr *uploadv1.UploadHeader, body io.Reader) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := uploadclient.Upload(ctx, c, hdr, body, uploadclient.Options{ChunkSize: 1 << 20})
		done <- err
	}()
	return done
}

// openUpload opens an Upload stream and sends hdr, then data in 1 MiB
// chunks, and leaves the stream open: the caller goes on, stalls or
// abandons it.
func openUpload(ctx context.Context, t testing.TB, c uploadv1.UploadServiceClient, hdr *uploadv1.UploadHeader, data []byte) uploadv1.UploadService_UploadClient {
	t.Helper()
	stream, err := c.Upload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: hdr}}); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 1 << 20 {
		if err := stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: data[off:min(off+1<<20, len(data))]}}); err != nil {
			t.Fatal(err)
		}
	}
	return stream
}

// poll waits up to d for cond to hold, checking every 10 ms, and fails
// the test naming what it waited for.
func poll(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s after %s", what, d)
		}
	}
}
