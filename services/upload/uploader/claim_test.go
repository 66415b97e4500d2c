package uploader_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// Two uploads under one idempotency key and one object key cannot both
// write: the later write would replace the object the first one records.
// While a large upload runs, a second one under its key gets ABORTED with
// a retry delay and writes nothing; the first lands intact; afterwards
// the same bytes are answered from the record and other bytes are refused,
// and the object still holds the first upload's bytes.
func TestIdempotencyKeyOneUploadAtATime(t *testing.T) {
	st := startStack(t, 1, func(c *uploader.Config) { c.PartSize = budgetPart })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	first := testenv.OpaqueBytes(t, 3*budgetPart-1000)
	hdr := func(size int) *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{Key: "claim/object.bin", IdempotencyKey: "order-42", ContentType: "application/octet-stream", Size: int64(size)}
	}
	stream := openUpload(ctx, t, st.Upload, hdr(len(first)), first[:1<<20])
	waitReserved(t, st)

	other := testenv.OpaqueBytes(t, 1024)
	_, err := send(ctx, st.Upload, hdr(len(other)), other)
	if status.Code(err) != codes.Aborted || !hasRetryInfo(err) || !strings.Contains(err.Error(), "in progress") {
		t.Fatalf("second upload under a running upload's idempotency key: %v, want ABORTED (in progress) with a retry delay", err)
	}
	if _, _, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: st.Buckets[0].GetId(), Key: "claim/object.bin"}); status.Code(err) != codes.NotFound {
		t.Fatalf("read while only the first upload runs: %v, want NOT_FOUND", err)
	}

	for off := 1 << 20; off < len(first); off += 1 << 20 {
		if err := stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: first[off:min(off+1<<20, len(first))]}}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatalf("first upload: %v", err)
	}
	readBack(ctx, t, st.Upload, resp, first, "first upload")

	if _, err := send(ctx, st.Upload, hdr(len(other)), other); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("other bytes under the recorded key: %v, want FAILED_PRECONDITION", err)
	}
	again, err := send(ctx, st.Upload, hdr(len(first)), first)
	if err != nil || !again.GetReplayed() || again.GetSha256() != resp.GetSha256() {
		t.Fatalf("the first upload's bytes again: %v, %v; want its recorded result", again, err)
	}
	readBack(ctx, t, st.Upload, resp, first, "object after the refused uploads")
	if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != int64(len(first)) {
		t.Fatalf("usage %v, want the first upload counted once (%d bytes)", used, len(first))
	}
	st.waitNoReservations(t)
}

// A failed upload gives its idempotency key back before it answers, so
// the client's retry goes through at once rather than after the claim
// lapses (30 s here): a large upload whose bytes contradict its declared
// sha256 fails, and the retry with the right bytes lands.
func TestFailedUploadGivesItsClaimBack(t *testing.T) {
	st := startStack(t, 1, func(c *uploader.Config) { c.PartSize = budgetPart })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 2*budgetPart+1000)
	corrupt := bytes.Clone(data)
	corrupt[len(corrupt)-1] ^= 1
	sum := sha256.Sum256(data)
	hdr := &uploadv1.UploadHeader{Key: "claim/retried.bin", IdempotencyKey: "order-43", ContentType: "application/octet-stream",
		Size: int64(len(data)), Sha256: hex.EncodeToString(sum[:])}
	if _, err := send(ctx, st.Upload, hdr, corrupt); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("upload with bytes that contradict the declared sha256: %v, want INVALID_ARGUMENT", err)
	}
	resp, err := send(ctx, st.Upload, hdr, data)
	if err != nil {
		t.Fatalf("retry right after the failed upload: %v", err)
	}
	readBack(ctx, t, st.Upload, resp, data, "retried upload")
}

// overtaken runs overtake once, just before the first Allocate that
// carries an idempotency claim goes to the allocator.
type overtaken struct {
	uploader.Allocator
	started  atomic.Bool
	overtake func()
}

func (o *overtaken) Allocate(ctx context.Context, in *allocatorv1.AllocateRequest, opts ...grpc.CallOption) (*allocatorv1.AllocateResponse, error) {
	if in.GetClaim() != nil && o.started.CompareAndSwap(false, true) {
		o.overtake()
	}
	return o.Allocator.Allocate(ctx, in, opts...)
}

// An upload whose key another upload recorded after this one looked for
// a record (and before it allocated) answers with that record, as a
// replay, and writes nothing: here the other upload runs to its end
// between the two.
func TestUploadOvertakenUnderItsKeyIsReplayed(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 4096)
	hdr := &uploadv1.UploadHeader{Key: "claim/overtaken.bin", IdempotencyKey: "order-44", ContentType: "application/octet-stream", Size: int64(len(data))}
	var st *stack
	var first *uploadv1.UploadResponse
	gate := &overtaken{overtake: func() {
		var err error
		if first, err = send(ctx, st.Upload, hdr, data); err != nil {
			t.Errorf("the overtaking upload: %v", err)
		}
	}}
	st = startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, func(a uploader.Allocator) uploader.Allocator {
		gate.Allocator = a
		return gate
	})
	resp, err := send(ctx, st.Upload, hdr, data)
	if err != nil {
		t.Fatalf("overtaken upload: %v", err)
	}
	if first == nil || !resp.GetReplayed() || resp.GetEtag() != first.GetEtag() || resp.GetKey() != first.GetKey() {
		t.Fatalf("overtaken upload answered %v; want a replay of %v", resp, first)
	}
	readBack(ctx, t, st.Upload, resp, data, "overtaken upload")
	if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != int64(len(data)) {
		t.Fatalf("usage %v, want the object counted once (%d bytes)", used, len(data))
	}
	st.waitNoReservations(t)
}

// countingReader counts the reads its client made.
type countingReader struct {
	io.Reader
	reads atomic.Int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.Reader.Read(b)
	c.reads.Add(1)
	return n, err
}

// A multipart upload that lasts several reservation TTLs keeps its
// idempotency key: the claim is renewed with the reservation, so well
// past the first TTL a second upload under the key is still turned away
// (unrenewed, the claim would have lapsed and the second upload would
// write over the first one's object).
func TestLongUploadKeepsItsClaim(t *testing.T) {
	st, data, body := slowUpload(t, 2*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	hdr := func(size int) *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{Key: "claim/long.bin", IdempotencyKey: "order-45", ContentType: "application/octet-stream", Size: int64(size)}
	}
	slow := &countingReader{Reader: body}
	done := make(chan error, 1)
	var resp *uploadv1.UploadResponse
	go func() {
		var err error
		resp, err = uploadclient.Upload(ctx, st.Upload, hdr(len(data)), slow, uploadclient.Options{ChunkSize: slowChunk})
		done <- err
	}()
	// 18 of its 24 reads: 2.7 TTLs after the upload started.
	for deadline := time.Now().Add(30 * time.Second); slow.reads.Load() < 18; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the slow upload made only %d reads in 30s", slow.reads.Load())
		}
	}
	other := testenv.OpaqueBytes(t, 1024)
	if _, err := send(ctx, st.Upload, hdr(len(other)), other); status.Code(err) != codes.Aborted {
		t.Fatalf("upload under the key of an upload running for 2.7 claim TTLs: %v, want ABORTED", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("slow upload: %v", err)
	}
	readBack(ctx, t, st.Upload, resp, data, "slow upload")
}

// An upload keeps its idempotency claim when it fails over: its next
// Allocate carries the same token, so the claim it took on the first
// bucket does not turn it away from the second, and the key is recorded
// once, for the bucket the object landed on.
func TestFailoverKeepsTheClaim(t *testing.T) {
	st := startStack(t, 2, nil)
	first := st.Buckets[0].GetId()
	st.Proxies[first].SetForNext("PutObject", faultproxy.Error5xx, 1) // a PUT is tried once
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1000)
	hdr := &uploadv1.UploadHeader{Key: "claim/failover.bin", IdempotencyKey: "order-46", ContentType: "application/octet-stream", Size: int64(len(data))}
	resp, err := send(ctx, st.Upload, hdr, data)
	if err != nil || resp.GetBucketId() == first {
		t.Fatalf("upload while %s fails: %v on %s", first, err, resp.GetBucketId())
	}
	again, err := send(ctx, st.Upload, hdr, data)
	if err != nil || !again.GetReplayed() || again.GetBucketId() != resp.GetBucketId() {
		t.Fatalf("the same upload again: %v, %v; want a replay naming %s", again, err, resp.GetBucketId())
	}
	readBack(ctx, t, st.Upload, resp, data, "failed-over upload")
	st.waitNoReservations(t)
}

// unansweredRenew fails every Renew as an allocator out of reach does,
// once cut is set; with aborted set, as one that found the claim taken
// over by another upload.
type unansweredRenew struct {
	uploader.Allocator
	cut, aborted atomic.Bool
}

func (u *unansweredRenew) Renew(ctx context.Context, in *allocatorv1.RenewRequest, opts ...grpc.CallOption) (*allocatorv1.RenewResponse, error) {
	switch {
	case u.aborted.Load():
		return nil, status.Error(codes.Aborted, "another upload holds this idempotency key")
	case u.cut.Load():
		return nil, status.Error(codes.Unavailable, "connection refused")
	}
	return u.Allocator.Renew(ctx, in, opts...)
}

// An upload under a client's key and an idempotency key whose renewals go
// unanswered stops before its claim on the key lapses: another upload
// under the key may then take it over and store the object, and this one,
// written later over the same key, would replace what that one's record
// names. The second upload's object stands, and reads back as its bytes.
func TestUnrenewedClaimStopsItsUpload(t *testing.T) {
	st, cutter := renewingThrough(t, 2*time.Second, func(a uploader.Allocator) *unansweredRenew { return &unansweredRenew{Allocator: a} })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	hdr := func(size int) *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{Key: "orders/1.bin", IdempotencyKey: "order-1", ContentType: "application/octet-stream", Size: int64(size)}
	}
	first := testenv.OpaqueBytes(t, 12<<20)
	stream := openUpload(ctx, t, st.Upload, hdr(len(first)), first[:1<<20])
	waitReserved(t, st)
	cutter.cut.Store(true)
	// Another upload under the key is turned away while the first holds
	// it, and stores its object once the first gave it up.
	second := testenv.OpaqueBytes(t, 1000)
	stored := takeOver(ctx, t, st, hdr(len(second)), second)
	// The first client sends the rest: its upload stopped meanwhile.
	if err := finish(stream, first); status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "did not answer this upload's renewals") || !hasRetryInfo(err) {
		t.Fatalf("first upload, its renewals unanswered: %v, want UNAVAILABLE with RetryInfo saying its renewals went unanswered", err)
	}
	readBack(ctx, t, st.Upload, stored, second, "the object the second upload stored")
	if objects, multiparts := st.objects(t); objects[st.Buckets[0].GetId()] != 1 || multiparts[st.Buckets[0].GetId()] != 0 {
		t.Fatalf("%v objects and %v open multipart uploads, want the second upload's object alone", objects, multiparts)
	}
}

// An upload that learns from a renewal that another upload took its
// idempotency key over stops ABORTED, with RetryInfo like every ABORTED
// it answers: a retry gets the other upload's result.
func TestClaimTakenOverIsRetryable(t *testing.T) {
	st, cutter := renewingThrough(t, 2*time.Second, func(a uploader.Allocator) *unansweredRenew { return &unansweredRenew{Allocator: a} })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 12<<20)
	stream := openUpload(ctx, t, st.Upload, &uploadv1.UploadHeader{Key: "orders/2.bin", IdempotencyKey: "order-2", ContentType: "application/octet-stream", Size: int64(len(data))}, data[:1<<20])
	poll(t, 10*time.Second, "the multipart upload created", func() bool {
		_, multiparts := st.objects(t)
		return multiparts[st.Buckets[0].GetId()] == 1
	})
	cutter.aborted.Store(true)
	// The upload stops at the next renewal, while its client still sends.
	poll(t, 10*time.Second, "abort of the multipart upload", func() bool {
		_, multiparts := st.objects(t)
		return multiparts[st.Buckets[0].GetId()] == 0
	})
	_, err := stream.CloseAndRecv()
	if status.Code(err) != codes.Aborted || !hasRetryInfo(err) {
		t.Fatalf("upload whose claim was taken over: %v (RetryInfo %v), want ABORTED with RetryInfo", err, hasRetryInfo(err))
	}
}

// slowFirstRenew leaves the first Renew unanswered until the caller gives
// up, as an allocator stalled on etcd does, and answers the rest.
type slowFirstRenew struct {
	uploader.Allocator
	calls, answered atomic.Int32
}

func (s *slowFirstRenew) Renew(ctx context.Context, in *allocatorv1.RenewRequest, opts ...grpc.CallOption) (*allocatorv1.RenewResponse, error) {
	if s.calls.Add(1) == 1 {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	resp, err := s.Allocator.Renew(ctx, in, opts...)
	if err == nil {
		s.answered.Add(1)
	}
	return resp, err
}

// One renewal that goes unanswered does not stop an upload holding a
// claim: the renewal is tried again soon, and the upload goes on.
func TestOneSlowRenewalKeepsTheClaim(t *testing.T) {
	st, slow := renewingThrough(t, 6*time.Second, func(a uploader.Allocator) *slowFirstRenew { return &slowFirstRenew{Allocator: a} })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 12<<20)
	body := &gatedReader{r: bytes.NewReader(data), left: 6 << 20, open: make(chan struct{})}
	done := uploadInBackground(ctx, st.Upload, &uploadv1.UploadHeader{Key: "slow/renew.bin", IdempotencyKey: "slow-1", ContentType: "application/octet-stream", Size: int64(len(data))}, body)
	poll(t, 20*time.Second, "renewal answered after the unanswered one", func() bool { return slow.answered.Load() > 0 })
	close(body.open)
	if err := <-done; err != nil {
		t.Fatalf("upload whose one renewal went unanswered: %v, want success", err)
	}
}

// hungRenew leaves every Renew unanswered until the caller gives up once
// cut is set, as an allocator stalled on etcd does, and notes when each
// such call returned.
type hungRenew struct {
	uploader.Allocator
	cut      atomic.Bool
	mu       sync.Mutex
	returned []time.Time
}

func (h *hungRenew) Renew(ctx context.Context, in *allocatorv1.RenewRequest, opts ...grpc.CallOption) (*allocatorv1.RenewResponse, error) {
	if !h.cut.Load() {
		return h.Allocator.Renew(ctx, in, opts...)
	}
	<-ctx.Done()
	h.mu.Lock()
	h.returned = append(h.returned, time.Now())
	h.mu.Unlock()
	return nil, status.FromContextError(ctx.Err()).Err()
}

// Renewals that hang rather than fail fast stop an upload holding a claim
// before the claim lapses too: each is given up on in time. Another
// upload under the key stores its object only after this one stopped,
// and that object stands.
func TestHungRenewalsStopTheUploadBeforeItsClaimLapses(t *testing.T) {
	st, hung := renewingThrough(t, 9*time.Second, func(a uploader.Allocator) *hungRenew { return &hungRenew{Allocator: a} })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	hdr := func(size int) *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{Key: "orders/hung.bin", IdempotencyKey: "order-hung", ContentType: "application/octet-stream", Size: int64(size)}
	}
	first := testenv.OpaqueBytes(t, 12<<20)
	stream := openUpload(ctx, t, st.Upload, hdr(len(first)), first[:1<<20])
	waitReserved(t, st)
	hung.cut.Store(true)
	second := testenv.OpaqueBytes(t, 1000)
	stored := takeOver(ctx, t, st, hdr(len(second)), second)
	storedAt := time.Now()
	hung.mu.Lock()
	for _, r := range hung.returned {
		if r.After(storedAt) {
			t.Errorf("the first upload still waited on a renewal (until %v) after another upload took its key and stored the object (%v)", r, storedAt)
		}
	}
	hung.mu.Unlock()
	if err := finish(stream, first); status.Code(err) != codes.Unavailable {
		t.Fatalf("first upload, its renewals hung: %v, want UNAVAILABLE", err)
	}
	readBack(ctx, t, st.Upload, stored, second, "the object the second upload stored")
}

// takeOver stores data under hdr once the key is free, polling: another
// upload under the idempotency key is turned away (ABORTED) while one
// holds it.
func takeOver(ctx context.Context, t *testing.T, st *stack, hdr *uploadv1.UploadHeader, data []byte) *uploadv1.UploadResponse {
	t.Helper()
	var stored *uploadv1.UploadResponse
	poll(t, 30*time.Second, "the second upload stored", func() bool {
		resp, err := send(ctx, st.Upload, hdr, data)
		if err != nil && status.Code(err) != codes.Aborted {
			t.Fatalf("second upload: %v, want ABORTED until the key is free, then success", err)
		}
		stored = resp
		return err == nil
	})
	return stored
}

// finish sends data after its first MiB on stream, as far as the server
// takes it, and returns the upload's outcome.
func finish(stream uploadv1.UploadService_UploadClient, data []byte) error {
	for off := 1 << 20; off < len(data); off += 1 << 20 {
		if stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: data[off:min(off+1<<20, len(data))]}}) != nil {
			break
		}
	}
	_, err := stream.CloseAndRecv()
	return err
}

// lateThenHungRenew answers the first Renew late, leaves the second
// unanswered until the caller gives up, and answers the rest.
type lateThenHungRenew struct {
	uploader.Allocator
	late            time.Duration
	calls, answered atomic.Int32
}

func (l *lateThenHungRenew) Renew(ctx context.Context, in *allocatorv1.RenewRequest, opts ...grpc.CallOption) (*allocatorv1.RenewResponse, error) {
	switch l.calls.Add(1) {
	case 1:
		resp, err := l.Allocator.Renew(ctx, in, opts...)
		time.Sleep(l.late)
		return resp, err
	case 2:
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	resp, err := l.Allocator.Renew(ctx, in, opts...)
	if err == nil {
		l.answered.Add(1)
	}
	return resp, err
}

// Renewals are due a period after the last one was sent, not after its
// answer came: a late answer followed by one unanswered renewal leaves
// time for a retry, and the upload holding a claim goes on.
func TestLateRenewalThenAnUnansweredOneKeepsTheClaim(t *testing.T) {
	// With a claim a renewal may take a sixth of the TTL: 500 ms here,
	// which the retry after the unanswered one needs on a loaded machine
	// (at a 2 s TTL, 333 ms was sometimes too little). The late answer
	// scales with the TTL: scheduled from the answer, the retry would
	// get only 115 ms.
	st, late := renewingThrough(t, 3*time.Second, func(a uploader.Allocator) *lateThenHungRenew {
		return &lateThenHungRenew{Allocator: a, late: 435 * time.Millisecond}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 12<<20)
	body := &gatedReader{r: bytes.NewReader(data), left: 6 << 20, open: make(chan struct{})}
	done := uploadInBackground(ctx, st.Upload, &uploadv1.UploadHeader{Key: "slow/late.bin", IdempotencyKey: "late-1", ContentType: "application/octet-stream", Size: int64(len(data))}, body)
	poll(t, 20*time.Second, "renewal answered after the unanswered one", func() bool { return late.answered.Load() > 0 })
	close(body.open)
	if err := <-done; err != nil {
		t.Fatalf("upload whose renewal was answered late, then not at all: %v, want success", err)
	}
}

// renewingThrough starts a stack with 5 MiB parts whose reservations and
// claims live ttl, and whose upload service calls the allocator through
// what wrap makes of it.
func renewingThrough[W uploader.Allocator](t *testing.T, ttl time.Duration, wrap func(uploader.Allocator) W) (*stack, W) {
	t.Helper()
	var w W
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint},
		func(c *allocator.Config) { c.ReservationTTL = ttl },
		func(c *uploader.Config) { c.PartSize = 5 << 20 },
		func(a uploader.Allocator) uploader.Allocator {
			w = wrap(a)
			return w
		})
	return st, w
}
