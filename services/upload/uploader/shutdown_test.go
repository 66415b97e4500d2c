package uploader_test

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/grpcserver"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

// A replica shut down (a rolling deploy) while a multipart upload is
// half sent: once StopTimeout cuts the stream, the upload aborts its
// multipart upload and gives its reservation back before Serve returns,
// so the process exits leaving nothing to the janitor or the lease TTL.
// The client gets UNAVAILABLE, which it retries elsewhere.
func TestShutdownMidUploadLeavesNothing(t *testing.T) {
	// Reservations outlive the test unless given back: the capacity
	// returns only through the upload's Release.
	st := startStackAt(t, []string{testenv.S3(t).Endpoint}, func(c *allocator.Config) { c.ReservationTTL = 5 * time.Minute }, nil)
	srv := grpcserver.New(grpcserver.Options{
		Logger: slog.New(slog.DiscardHandler), StopTimeout: 100 * time.Millisecond, CleanupTimeout: 10 * time.Second,
		ServerOptions: st.Server.ServerOptions(),
	})
	st.Server.Register(srv.GRPC)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx, lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const size = 3*(8<<20) - 1000 // three parts
	stream := openUpload(ctx, t, uploadv1.NewUploadServiceClient(conn),
		&uploadv1.UploadHeader{NameHint: "deploy.bin", ContentType: "application/octet-stream", Size: size}, testenv.OpaqueBytes(t, 9<<20))
	id := st.Buckets[0].GetId()
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, mp := st.objects(t); mp[id] == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the multipart upload never started")
		}
	}
	if _, reserved := st.usage(t); reserved[id] == 0 {
		t.Fatal("the upload holds no reservation")
	}

	stop()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	// The bucket is clean by the time Serve returned.
	if objects, mp := st.objects(t); objects[id] != 0 || mp[id] != 0 {
		t.Fatalf("after shutdown: %d objects, %d open multipart uploads", objects[id], mp[id])
	}
	if used, _ := st.usage(t); used[id] != 0 {
		t.Fatalf("after shutdown: %d bytes used", used[id])
	}
	// The status counts capacity blocks, which the allocator shrinks a
	// moment after their reservations end.
	st.waitNoReservations(t)
	if _, err := stream.CloseAndRecv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("client saw %v, want UNAVAILABLE", err)
	}
}
