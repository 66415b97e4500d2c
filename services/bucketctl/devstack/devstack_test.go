package devstack_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/s3gw"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"

	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
)

// The whole path over plain HTTP to the gateway: upload 20 MiB, read it
// back through the service and straight from the bucket, usage == bytes;
// bad input answers INVALID_ARGUMENT and leaves nothing behind.
func TestEndToEnd(t *testing.T) {
	env := e2e.Start(t, false)
	t.Run("RoundTrip", func(t *testing.T) { e2e.RoundTrip(t, env) })
	t.Run("BadInput", func(t *testing.T) { e2e.BadInput(t, env) })
}

// A data dir from an earlier run works with the gateway on another port
// (the README tells users to move ports that are taken): the default
// buckets follow the gateway. A gateway port that is taken fails the
// start, naming the address, instead of running beside another server.
func TestRestartWithTheGatewayMoved(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := func(s3Addr string) (*devstack.Stack, error) {
		return devstack.Start(ctx, devstack.Options{DataDir: dir, Logger: slog.New(slog.DiscardHandler),
			EtcdAddr: "127.0.0.1:0", AllocatorAddr: "127.0.0.1:0", UploadAddr: "127.0.0.1:0", S3Addr: s3Addr})
	}
	first, err := start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	firstS3 := first.S3.Endpoint
	// An operator's change (as through the admin API) outlives the
	// restart, and the stack reports it, not the configured seed.
	if _, err := ledger.New(first.EtcdClient, ledger.Options{}).UpdateBucket(ctx, "dev-hot", func(b *adminv1.BucketSpec) { b.MonthlyLimitBytes = 20 << 30 }); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	second, err := start("127.0.0.1:0") // another free port
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	stored, err := second.StoredBuckets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range stored {
		if b.GetId() == "dev-hot" && b.GetMonthlyLimitBytes() != 20<<30 {
			t.Fatalf("stored dev-hot has a limit of %d bytes, want the 20 GiB set before the restart", b.GetMonthlyLimitBytes())
		}
	}
	if len(stored) != 3 {
		t.Fatalf("%d buckets stored, want the 3 defaults", len(stored))
	}
	if second.S3.Endpoint == firstS3 {
		t.Skip("the OS gave the gateway the same port again")
	}
	conn, err := devstack.Dial(second.UploadAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	data := e2e.RandomBytes(t, 1000)
	if _, err := uploadclient.Upload(ctx, uploadv1.NewUploadServiceClient(conn), &uploadv1.UploadHeader{
		NameHint: "f.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, bytes.NewReader(data), uploadclient.Options{}); err != nil {
		t.Fatalf("upload after the gateway moved from %s to %s: %v", firstS3, second.S3.Endpoint, err)
	}

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	if _, err := s3gw.Start(ctx, s3gw.Options{Dir: t.TempDir(), Addr: taken.Addr().String()}); err == nil || !strings.Contains(err.Error(), taken.Addr().String()) {
		t.Fatalf("a gateway on a taken port: %v, want it refused naming the address", err)
	}
}

// The dev stack limits each client's upload calls as production does,
// when asked to (`bucketctl dev` asks with the configuration's defaults):
// past the burst, a call gets RESOURCE_EXHAUSTED before anything is stored.
func TestRateLimit(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{RateLimit: 0.01, RateBurst: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	data := []byte("hello")
	hdr := &uploadv1.UploadHeader{NameHint: "r.txt", ContentType: "text/plain", Size: int64(len(data))}
	if _, err := uploadclient.Upload(ctx, env.Upload, hdr, bytes.NewReader(data), uploadclient.Options{}); err != nil {
		t.Fatalf("first upload: %v", err)
	}
	_, err := uploadclient.Upload(ctx, env.Upload, hdr, bytes.NewReader(data), uploadclient.Options{})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("second upload past the burst: %v, want ResourceExhausted", err)
	}
	if objects, _ := env.ObjectCount(t); objects != 1 {
		t.Fatalf("%d objects stored, want the first upload's only", objects)
	}
}

// Stopping the stack (Ctrl-C in make run) while an upload still streams
// lets it finish: the allocator stops only once the upload service has
// drained, so the upload's Commit still reaches it, and the object stays.
func TestStopLetsRunningUploadsCommit(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := devstack.Start(ctx, devstack.Options{DataDir: t.TempDir(), Logger: slog.New(slog.DiscardHandler),
		EtcdAddr: "127.0.0.1:0", AllocatorAddr: "127.0.0.1:0", UploadAddr: "127.0.0.1:0", S3Addr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := devstack.Dial(st.UploadAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := uploadv1.NewUploadServiceClient(conn).Upload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	data := e2e.RandomBytes(t, 2048)
	send := func(msg *uploadv1.UploadRequest) {
		t.Helper()
		if err := stream.Send(msg); err != nil {
			t.Fatal(err)
		}
	}
	send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: &uploadv1.UploadHeader{
		NameHint: "s.bin", ContentType: "application/octet-stream", Size: int64(len(data))}}})
	send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: data[:1024]}})
	closed := make(chan error, 1)
	go func() { closed <- st.Close() }()
	// The upload service takes no new connections once it drains; the
	// allocator, with no call running, would be gone by then.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		c, err := net.DialTimeout("tcp", st.UploadAddr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("the upload service still takes connections 10 s after the stack began to stop")
		}
	}
	send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: data[1024:]}})
	resp, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatalf("an upload streaming when the stack stopped: %v, want it stored", err)
	}
	if err := <-closed; err != nil {
		t.Fatalf("close: %v", err)
	}
	if resp.GetSize() != int64(len(data)) {
		t.Fatalf("stored %d bytes, want %d", resp.GetSize(), len(data))
	}
}
