package uploader_test

import (
	"bytes"
	"context"
	clientv3 "go.etcd.io/etcd/client/v3"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
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
	watch, serverSawCancel := streamEnded()
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, func(a uploader.Allocator) uploader.Allocator {
		gate.Allocator = a
		return gate
	}, watch)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	data := testenv.OpaqueBytes(t, 4096)
	done := sendInBackground(ctx, st.Upload, &uploadv1.UploadHeader{Key: "gone/during-commit.bin", ContentType: "application/octet-stream"}, data)
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

// commitAnswersLost applies every Commit while switched on and loses the
// answer, as an allocator behind a broken connection would.
type commitAnswersLost struct {
	uploader.Allocator
	on atomic.Bool
}

func (c *commitAnswersLost) Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error) {
	resp, err := c.Allocator.Commit(ctx, in, opts...)
	if c.on.Load() {
		return nil, status.Error(codes.Unavailable, "connection reset (test)")
	}
	return resp, err
}

// Every answer to an upload's Commit is lost, but the Commit applied and
// recorded the object under the upload's idempotency key. The upload fails
// UNAVAILABLE and keeps the object, so the retry with the key answers with
// an object that is there, counted once (before, the object was removed
// and the retry answered with an object that was gone).
func TestUnansweredCommitKeepsTheRecordedObject(t *testing.T) {
	lost := &commitAnswersLost{}
	lost.on.Store(true)
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, func(a uploader.Allocator) uploader.Allocator {
		lost.Allocator = a
		return lost
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 4096)
	hdr := &uploadv1.UploadHeader{NameHint: "r.bin", ContentType: "application/octet-stream", Size: int64(len(data)), IdempotencyKey: "unanswered-commit-1"}
	if _, err := send(ctx, st.Upload, hdr, data); status.Code(err) != codes.Unavailable {
		t.Fatalf("upload whose Commit answers are lost: %v, want Unavailable", err)
	}
	lost.on.Store(false)
	resp, err := send(ctx, st.Upload, hdr, data)
	if err != nil || !resp.GetReplayed() {
		t.Fatalf("retry with the key: %v (replayed %v), want the recorded result", err, resp.GetReplayed())
	}
	_, got, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()})
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the object the retry answered with: %d bytes, %v; want the uploaded bytes", len(got), err)
	}
	if objects, _ := st.objects(t); objects[resp.GetBucketId()] != 1 {
		t.Fatalf("%d objects, want 1", objects[resp.GetBucketId()])
	}
	if used, _ := st.usage(t); used[resp.GetBucketId()] != int64(len(data)) {
		t.Fatalf("usage %d, want %d counted once", used[resp.GetBucketId()], len(data))
	}
	st.waitNoReservations(t)
}

// refusedCommit holds the Commit of an upload of size bytes until release
// is closed, then refuses it as the allocator does a lost reservation.
type refusedCommit struct {
	uploader.Allocator
	size    int64
	held    chan struct{}
	release chan struct{}
}

func (f *refusedCommit) Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error) {
	if in.GetSize() == f.size {
		close(f.held)
		<-f.release
		return nil, status.Error(codes.FailedPrecondition, "reservation expired and the bucket has no room to grant it again")
	}
	return f.Allocator.Commit(ctx, in, opts...)
}

// An upload whose Commit fails removes its own object, never another
// upload's: under a client's key, a later upload may have written the key
// and been answered OK meanwhile, and its object must stay (before, the
// failed upload removed it, and the client that was told OK lost it).
func TestFailedCommitKeepsAnotherUploadsObject(t *testing.T) {
	const sizeA, sizeB = 1000, 2000
	rc := &refusedCommit{size: sizeA, held: make(chan struct{}), release: make(chan struct{})}
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, func(a uploader.Allocator) uploader.Allocator { rc.Allocator = a; return rc })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const key = "shared/report.bin"
	a, b := testenv.OpaqueBytes(t, sizeA), testenv.OpaqueBytes(t, sizeB)
	errA := make(chan error, 1)
	go func() {
		_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{Key: key, ContentType: "application/octet-stream", Size: sizeA}, a)
		errA <- err
	}()
	<-rc.held // A's object is written; its Commit waits
	respB, err := send(ctx, st.Upload, &uploadv1.UploadHeader{Key: key, ContentType: "application/octet-stream", Size: sizeB}, b)
	if err != nil {
		t.Fatalf("B: %v", err)
	}
	close(rc.release)
	if err := <-errA; status.Code(err) != codes.Unavailable {
		t.Fatalf("A, whose Commit was refused: %v, want Unavailable", err)
	}
	readBack(ctx, t, st.Upload, respB, b, "B's object after A's Commit failed")
}

// lateWrite holds the first write that match selects. Released, it goes
// to the bucket; failed to the service first (its caller's context ended,
// or lose is set, as when the answer is lost), it reaches the bucket right
// after the service's next DELETE (a removal or an abort), as a write the
// bucket took in and finished after the service had looked.
type lateWrite struct {
	c       *http.Client
	match   func(*http.Request) bool
	lose    bool
	held    chan struct{} // closed once the write is held
	decided chan struct{} // closed once it is sent or pending
	release chan struct{}
	once    sync.Once
	mu      sync.Mutex
	pending *http.Request
}

func newLateWrite(match func(*http.Request) bool, lose bool) *lateWrite {
	return &lateWrite{c: &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}, match: match, lose: lose,
		held: make(chan struct{}), decided: make(chan struct{}), release: make(chan struct{})}
}

func (l *lateWrite) Do(r *http.Request) (*http.Response, error) {
	first := false
	if l.match(r) {
		l.once.Do(func() { first = true })
	}
	if first {
		return l.hold(r)
	}
	resp, err := l.c.Do(r)
	if r.Method == http.MethodDelete {
		// The service may remove before the held call has seen its
		// context end (the SDK returns at once when it does).
		select {
		case <-l.held:
			<-l.decided
		default:
		}
		l.mu.Lock()
		p := l.pending
		l.pending = nil
		l.mu.Unlock()
		if p != nil {
			if resp, err := l.c.Do(p); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
			}
		}
	}
	return resp, err
}

func (l *lateWrite) hold(r *http.Request) (*http.Response, error) {
	close(l.held)
	// Its body is read now: the SDK closes it once the call fails.
	body, err := io.ReadAll(r.Body)
	if err != nil {
		close(l.decided)
		return nil, err
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	err = &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
	if !l.lose {
		select {
		case <-l.release:
			close(l.decided)
			return l.c.Do(r)
		case <-r.Context().Done():
			err = r.Context().Err()
		}
	}
	l.mu.Lock()
	l.pending = r.Clone(context.Background())
	l.pending.Body = io.NopCloser(bytes.NewReader(body))
	l.mu.Unlock()
	close(l.decided)
	return nil, err
}

// A write the bucket finishes after the service stopped waiting for it
// leaves no object that usage does not count. A client that goes once it
// has sent everything does not cut the write off (one PUT, or a multipart
// upload's Complete): it runs to its answer and the upload is committed.
// A Complete whose answer is lost is aborted before the object is
// removed, so an object the bucket made late is found and removed.
func TestLateWriteLeavesNoUncountedObject(t *testing.T) {
	put := func(r *http.Request) bool { return r.Method == http.MethodPut && !r.URL.Query().Has("uploadId") }
	complete := func(r *http.Request) bool { return r.Method == http.MethodPost && r.URL.Query().Has("uploadId") }
	for _, tc := range []struct {
		name  string
		match func(*http.Request) bool
		size  int
		lose  bool
	}{
		{"client gone during the PUT", put, 1000, false},
		{"client gone during the Complete", complete, 11 << 20, false},
		{"the Complete's answer lost", complete, 11 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hc := newLateWrite(tc.match, tc.lose)
			st := startStack(t, 1, func(c *uploader.Config) { c.HTTPClient, c.PartSize = hc, 5<<20 })
			id := st.Buckets[0].GetId()
			data := testenv.OpaqueBytes(t, tc.size)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			done := sendInBackground(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "late.bin", ContentType: "application/octet-stream"}, data)
			select {
			case <-hc.held:
			case err := <-done:
				t.Fatalf("upload ended before its write: %v", err)
			}
			if !tc.lose {
				cancel()
			}
			if err := <-done; err == nil {
				t.Fatal("the upload succeeded")
			}
			close(hc.release)
			st.waitNoReservations(t)
			objects, multiparts := st.objects(t)
			used, _ := st.usage(t)
			want := map[bool]int{false: 1, true: 0}[tc.lose]
			if objects[id] != want || used[id] != int64(want*len(data)) || multiparts[id] != 0 {
				t.Fatalf("%d objects, %d open uploads, %d bytes used; want %d objects, all counted, none open", objects[id], multiparts[id], used[id], want)
			}
		})
	}
}

// A write the client left behind still runs to its own end (see
// TestLateWriteLeavesNoUncountedObject), and how it failed is the
// bucket's: a bucket that hangs every write cools down though each client
// gave up before the write's timeout.
func TestAbandonedWritesStillReportTheBucket(t *testing.T) {
	for _, tc := range []struct {
		op   string
		size int
	}{{"PutObject", 1000}, {"CompleteMultipartUpload", 9 << 20}} {
		t.Run(tc.op, func(t *testing.T) {
			st := startStack(t, 1, func(c *uploader.Config) { c.CallTimeout, c.DataTimeout = time.Second, time.Second })
			id := st.Buckets[0].GetId()
			p := st.Proxies[id]
			p.StallFor = time.Minute
			p.SetFor(tc.op, faultproxy.Stall)
			data := testenv.OpaqueBytes(t, tc.size)
			for i := 0; i < 3; i++ {
				ctx, cancel := context.WithCancel(context.Background())
				done := sendInBackground(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "hung.bin", ContentType: "application/octet-stream"}, data)
				poll(t, 30*time.Second, "the write to reach the bucket", func() bool { return p.Counts()[tc.op] > 0 })
				cancel()
				if err := <-done; status.Code(err) != codes.Canceled {
					t.Fatalf("upload %d: %v, want Canceled", i, err)
				}
			}
			waitFailures(t, st, id, 3)
			st.waitNoReservations(t)
		})
	}
}

// leaseEndsBeforeCommit revokes the allocator replica's etcd lease right
// before the first Commit it forwards, as when the replica paused for
// longer than the lease's TTL and has not yet noticed.
type leaseEndsBeforeCommit struct {
	uploader.Allocator
	cli *clientv3.Client
	on  atomic.Bool
	err atomic.Value // the Commit answers it saw fail
}

func (l *leaseEndsBeforeCommit) Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error) {
	if l.on.CompareAndSwap(true, false) {
		// A reservation id is "<replica>.<lease id, hex>~<random>".
		owner, _, _ := strings.Cut(in.GetReservationId(), "~")
		id, err := strconv.ParseInt(owner[strings.LastIndex(owner, ".")+1:], 16, 64)
		if err == nil {
			_, err = l.cli.Revoke(ctx, clientv3.LeaseID(id))
		}
		if err != nil {
			return nil, err
		}
	}
	resp, err := l.Allocator.Commit(ctx, in, opts...)
	if err != nil {
		l.err.Store(err)
	}
	return resp, err
}

// An allocator replica whose etcd lease ended before it noticed (a pause
// longer than the TTL) answers UNAVAILABLE, which the upload retries, and
// takes a new lease at once: the upload is stored and counted, not
// removed after an INTERNAL error.
func TestCommitAfterTheReplicasLeaseEnded(t *testing.T) {
	w := &leaseEndsBeforeCommit{}
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, func(a uploader.Allocator) uploader.Allocator { w.Allocator = a; return w })
	w.cli = testenv.EtcdClient(t, st.Etcd.Endpoint)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 4000)
	hdr := &uploadv1.UploadHeader{NameHint: "f.bin", ContentType: "application/octet-stream", Size: int64(len(data))}
	w.on.Store(true)
	resp, err := send(ctx, st.Upload, hdr, data)
	if err != nil {
		t.Fatalf("upload whose allocator lost its lease before the Commit: %v", err)
	}
	if e, ok := w.err.Load().(error); ok && status.Code(e) != codes.Unavailable {
		t.Fatalf("the allocator answered the Commit %v, want UNAVAILABLE", e)
	}
	if _, got, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %d bytes, %v", len(got), err)
	}
	if used, _ := st.usage(t); sumOf(used) != int64(len(data)) {
		t.Fatalf("usage %v, want the %d bytes once", used, len(data))
	}
}
