package uploader_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// lostCommitAnswer lets the first Commit through to the allocator and
// holds its answer until released; the answer is then lost (as over a
// broken connection) if the call's context has ended meanwhile.
type lostCommitAnswer struct {
	uploader.Allocator
	once    sync.Once
	applied chan struct{}
	release chan struct{}
}

func (l *lostCommitAnswer) Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error) {
	first := false
	l.once.Do(func() { first = true })
	resp, err := l.Allocator.Commit(context.WithoutCancel(ctx), in, opts...)
	if !first {
		return resp, err
	}
	close(l.applied)
	<-l.release
	if ctx.Err() != nil {
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	return resp, err
}

// A client that goes away while its upload's Commit is in flight leaves a
// consistent bucket: the Commit is settled, and the object it counted is
// still there (before, the lost answer made the service remove the object
// whose bytes the allocator had already counted).
func TestClientGoneDuringCommit(t *testing.T) {
	gate := &lostCommitAnswer{applied: make(chan struct{}), release: make(chan struct{})}
	// Closed once the server has seen the client go (its stream's context
	// ended), so the test knows when to let the held answer go.
	serverSawCancel := make(chan struct{})
	var seen sync.Once
	watch := grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		go func() {
			<-ss.Context().Done()
			seen.Do(func() { close(serverSawCancel) })
		}()
		return h(srv, ss)
	})
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, func(a uploader.Allocator) uploader.Allocator {
		gate.Allocator = a
		return gate
	}, watch)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	data := testenv.OpaqueBytes(t, 4096)
	done := make(chan error, 1)
	go func() {
		_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{Key: "gone/during-commit.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
		done <- err
	}()
	select {
	case <-gate.applied:
	case err := <-done:
		t.Fatalf("upload ended before its commit: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no commit within 30s")
	}
	cancel()
	<-done // the client has given up
	select {
	case <-serverSawCancel:
	case <-time.After(30 * time.Second):
		t.Fatal("the server did not see the client go within 30s")
	}
	close(gate.release)
	st.waitNoReservations(t)

	id := st.Buckets[0].GetId()
	used, _ := st.usage(t)
	tctx, tcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer tcancel()
	_, got, err := read(tctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: id, Key: "gone/during-commit.bin"})
	switch {
	case used[id] == int64(len(data)) && err == nil && string(got) == string(data):
		// Committed and kept: consistent.
	default:
		t.Fatalf("after the client left mid-commit: %d bytes counted, object read: %v (%d bytes); want the object kept and counted", used[id], err, len(got))
	}
}

// Two uploads under one idempotency key and one object key race: the
// second to commit gets the first's result, and the object that result
// names stays (the second used to delete its own copy, which was the very
// object the winner's record points to).
func TestIdempotentRaceKeepsTheObject(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 8192)
	hdr := &uploadv1.UploadHeader{Key: "race/same.bin", IdempotencyKey: "race-1", ContentType: "application/octet-stream", Size: int64(len(data))}

	// The late upload passes the idempotency check, sends half, and waits.
	late := openUpload(ctx, t, st.Upload, hdr, data[:4096])
	for deadline := time.Now().Add(15 * time.Second); st.Server.WaitingStreams() != 1; {
		if time.Now().After(deadline) {
			t.Fatal("the late upload did not get past its header")
		}
		time.Sleep(5 * time.Millisecond)
	}

	// The other one runs to the end and wins.
	won, err := send(ctx, st.Upload, hdr, data)
	if err != nil || won.GetReplayed() {
		t.Fatalf("winning upload: %v (replayed %v)", err, won.GetReplayed())
	}
	// The late one finishes, writing the same key again, and is told of
	// the winner.
	if err := late.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: data[4096:]}}); err != nil {
		t.Fatal(err)
	}
	got, err := late.CloseAndRecv()
	if err != nil || !got.GetReplayed() || got.GetKey() != won.GetKey() {
		t.Fatalf("late upload: %v, %v; want a replay of %v", got, err, won)
	}
	readBack(ctx, t, st.Upload, won, data, "the winner's object")
	st.waitNoReservations(t)
	if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != int64(len(data)) {
		t.Fatalf("usage %v, want the object counted once", used)
	}
}
