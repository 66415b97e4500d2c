package uploader_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/mimecheck"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

const adminToken = "test-admin-token"

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
	g := testenv.S3(t)
	_, etcd := testenv.Etcd(t)
	st := &stack{Proxies: map[string]*faultproxy.Proxy{}}
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
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	acfg := allocator.Config{Buckets: st.Buckets, AdminToken: adminToken}
	if tuneAlloc != nil {
		tuneAlloc(&acfg)
	}
	alloc, err := allocator.New(ctx, etcd, acfg, log)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = alloc.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; _ = alloc.Close() })
	unary, streamI := alloc.Interceptors()
	aconn := serve(t, alloc.Register, grpc.UnaryInterceptor(unary), grpc.StreamInterceptor(streamI))
	st.Admin, st.AllocatorAddr = adminv1.NewAdminServiceClient(aconn), aconn.Target()

	cfg := uploader.Config{
		Credentials:         objstore.StaticCredentials{"GW": {g.AccessKey, g.SecretKey}},
		AllowedContentTypes: append([]string{"application/octet-stream"}, mimecheck.DefaultAllowed...),
		BackoffBase:         time.Millisecond,
	}
	if tune != nil {
		tune(&cfg)
	}
	var client uploader.Allocator = allocatorv1.NewAllocatorServiceClient(aconn)
	if wrap != nil {
		client = wrap(client)
	}
	up, err := uploader.New(cfg, client, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = up.Close() })
	st.Server = up
	uconn := serve(t, up.Register, append(up.ServerOptions(), uploadOpts...)...)
	st.Upload, st.UploadAddr = uploadv1.NewUploadServiceClient(uconn), uconn.Target()
	if st.S3, err = g.Client(); err != nil {
		t.Fatal(err)
	}
	return st
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
