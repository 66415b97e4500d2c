package uploader_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// pacedReader hands out at most one chunk per tick: a client on a slow
// link.
type pacedReader struct {
	r     io.Reader
	chunk int
	tick  <-chan time.Time
}

func (p *pacedReader) Read(b []byte) (int, error) {
	<-p.tick
	return p.r.Read(b[:min(len(b), p.chunk)])
}

// The object slowUpload hands out: 12 MiB in 24 reads of 512 KiB.
const slowSize, slowChunk = 12 << 20, 512 << 10

// slowUpload starts a stack whose reservations live ttl, and returns an
// object's bytes with a reader that hands them out one chunk every 3/20
// of ttl: an upload of about 3.6 TTLs, multipart with 5 MiB parts.
func slowUpload(t *testing.T, ttl time.Duration) (*stack, []byte, io.Reader) {
	t.Helper()
	st := startStackAt(t, []string{testenv.S3(t).Endpoint},
		func(c *allocator.Config) { c.ReservationTTL = ttl },
		func(c *uploader.Config) { c.PartSize = 5 << 20 })
	data := testenv.OpaqueBytes(t, slowSize)
	tick := time.NewTicker(ttl * 3 / 20)
	t.Cleanup(tick.Stop)
	return st, data, &pacedReader{r: bytes.NewReader(data), chunk: slowChunk, tick: tick.C}
}

// A multipart upload that lasts several reservation TTLs keeps its
// capacity the whole time: the upload service renews the reservation, so
// at every sample the bucket holds the object's bytes as reserved (or,
// after the commit, as used), never neither. Without renewals the
// reservation lapses after one TTL and the allocator hands its capacity
// back while the upload is still running.
func TestLongUploadKeepsItsReservation(t *testing.T) {
	const ttl = 2 * time.Second
	st, data, body := slowUpload(t, ttl)
	bucket := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	type sample struct{ used, reserved int64 }
	// samples and sampleErr are read once sampled is closed.
	var samples []sample
	var sampleErr error
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			used, reserved, err := st.status(ctx)
			if err != nil {
				sampleErr = err
				return
			}
			samples = append(samples, sample{used[bucket], reserved[bucket]})
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	resp, err := uploadclient.Upload(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "slow.bin", ContentType: "application/octet-stream", Size: slowSize},
		body, uploadclient.Options{ChunkSize: slowChunk})
	close(stop)
	<-sampled
	if err != nil {
		t.Fatal(err)
	}
	if sampleErr != nil {
		t.Fatalf("GetStatus while uploading: %v", sampleErr)
	}
	if d := time.Since(start); d < 3*ttl {
		t.Fatalf("the upload took %s; the test needs at least 3 TTLs (%s)", d, 3*ttl)
	}
	if resp.GetSize() != int64(len(data)) || resp.GetBucketId() != bucket {
		t.Fatalf("response %v", resp)
	}
	// From the first sample that shows the reservation on, the bytes are
	// held as reserved or used at every sample.
	held := false
	for i, s := range samples {
		if s.used+s.reserved >= slowSize {
			held = true
			continue
		}
		if held {
			t.Fatalf("sample %d of %d: used %d + reserved %d < %d: the reservation lapsed during the upload", i, len(samples), s.used, s.reserved, slowSize)
		}
	}
	if !held {
		t.Fatalf("no sample showed the upload's reservation (%d samples)", len(samples))
	}
	if used, _ := st.usage(t); used[bucket] != slowSize {
		t.Fatalf("used %d, want %d", used[bucket], slowSize)
	}
}

// heldRequests holds every request match picks until release is closed,
// telling on started when the first arrives: a slow link or bucket. With
// landFirst, each is sent at once, so it lands at the bucket, and its
// answer is held instead (started then tells the first has landed); if
// the request's own context ends first, the answer is lost to the caller,
// as one still on its way when the caller gave up.
type heldRequests struct {
	c         *http.Client
	match     func(*http.Request) bool
	landFirst bool
	once      sync.Once
	started   chan struct{}
	release   chan struct{}
}

func hold(match func(*http.Request) bool) *heldRequests {
	return &heldRequests{c: &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}, match: match,
		started: make(chan struct{}), release: make(chan struct{})}
}

// holdAnswer is hold with landFirst.
func holdAnswer(match func(*http.Request) bool) *heldRequests {
	h := hold(match)
	h.landFirst = true
	return h
}

func (h *heldRequests) Do(r *http.Request) (*http.Response, error) {
	if !h.match(r) {
		return h.c.Do(r)
	}
	var resp *http.Response
	var err error
	if h.landFirst {
		resp, err = h.c.Do(r.Clone(context.WithoutCancel(r.Context())))
	}
	h.once.Do(func() { close(h.started) })
	select {
	case <-h.release:
	case <-r.Context().Done():
		if resp != nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
		}
		return nil, r.Context().Err()
	}
	if h.landFirst {
		return resp, err
	}
	return h.c.Do(r)
}

// singlePut matches a PutObject (not a part).
func singlePut(r *http.Request) bool {
	return r.Method == http.MethodPut && !r.URL.Query().Has("partNumber")
}

// A single PUT that outlasts the reservation TTL keeps its reservation and
// its idempotency claim, as a multipart upload does: the bytes stay held
// the whole time, and a second upload under the same idempotency key and
// object key is turned away (ABORTED) instead of writing the key beside
// it. Before, both lapsed after one TTL: the second upload was let in and
// answered OK, and the first then overwrote its object.
func TestSlowPutKeepsItsReservationAndClaim(t *testing.T) {
	const ttl = 3 * time.Second // a renewal may take ttl/6 with a claim: 500 ms, for a loaded machine
	hp := hold(singlePut)
	st := startStackAt(t, []string{testenv.S3(t).Endpoint},
		func(c *allocator.Config) { c.ReservationTTL = ttl },
		func(c *uploader.Config) { c.HTTPClient = hp })
	bucket := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1<<20)
	hdr := func() *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{Key: "slow/obj.bin", IdempotencyKey: "slow-key", ContentType: "application/octet-stream", Size: int64(len(data))}
	}
	first := make(chan error, 1)
	go func() {
		_, err := send(ctx, st.Upload, hdr(), data)
		first <- err
	}()
	<-hp.started
	// Two and a half TTLs into the PUT, sampled every 100 ms, the bytes
	// are held as reserved.
	for deadline := time.Now().Add(ttl * 5 / 2); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if _, reserved := st.usage(t); reserved[bucket] < int64(len(data)) {
			t.Fatalf("reserved %d during the PUT, want at least %d: the reservation lapsed", reserved[bucket], len(data))
		}
	}
	other := testenv.OpaqueBytes(t, len(data))
	if _, err := send(ctx, st.Upload, hdr(), other); status.Code(err) != codes.Aborted {
		t.Fatalf("second upload under the key while the first writes: %v, want Aborted", err)
	}
	close(hp.release)
	if err := <-first; err != nil {
		t.Fatalf("the slow upload: %v", err)
	}
	_, got, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: bucket, Key: "slow/obj.bin"})
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the object after the slow upload: %d bytes, %v; want its bytes", len(got), err)
	}
}

// createMultipart matches a CreateMultipartUpload.
func createMultipart(r *http.Request) bool {
	return r.Method == http.MethodPost && r.URL.Query().Has("uploads")
}

// A CreateMultipartUpload that outlasts the reservation TTL keeps the
// reservation and the idempotency claim: renewals start with the grant,
// not after the create. Before, neither was renewed while the create ran:
// both lapsed, a second upload under the key was let in, and the first
// one, once the create answered, lost its claim and failed.
func TestSlowCreateKeepsItsReservationAndClaim(t *testing.T) {
	const ttl = 3 * time.Second // see TestSlowPutKeepsItsReservationAndClaim
	hp := hold(createMultipart)
	st := startStackAt(t, []string{testenv.S3(t).Endpoint},
		func(c *allocator.Config) { c.ReservationTTL = ttl },
		func(c *uploader.Config) { c.HTTPClient = hp; c.PartSize = 5 << 20 })
	bucket := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 6<<20)
	hdr := func(size int) *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{Key: "slow/create.bin", IdempotencyKey: "slow-create", ContentType: "application/octet-stream", Size: int64(size)}
	}
	first := make(chan error, 1)
	go func() {
		_, err := send(ctx, st.Upload, hdr(len(data)), data)
		first <- err
	}()
	<-hp.started
	for deadline := time.Now().Add(ttl * 5 / 2); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if _, reserved := st.usage(t); reserved[bucket] < int64(len(data)) {
			t.Fatalf("reserved %d during the create, want at least %d: the reservation lapsed", reserved[bucket], len(data))
		}
	}
	other := testenv.OpaqueBytes(t, 1024)
	if _, err := send(ctx, st.Upload, hdr(len(other)), other); status.Code(err) != codes.Aborted {
		t.Fatalf("second upload under the key while the first creates its upload: %v, want Aborted", err)
	}
	close(hp.release)
	if err := <-first; err != nil {
		t.Fatalf("the upload with the slow create: %v", err)
	}
	_, got, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: bucket, Key: "slow/create.bin"})
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the object after the slow create: %d bytes, %v; want its bytes", len(got), err)
	}
	if used, _ := st.usage(t); used[bucket] != int64(len(data)) {
		t.Fatalf("used %d, want %d", used[bucket], len(data))
	}
}

// lapsingRenew answers every Renew once armed is closed as the allocator
// does a reservation that lapsed with no room to grant it again, and
// closes lapsed on the first such answer.
type lapsingRenew struct {
	uploader.Allocator
	armed  <-chan struct{}
	once   sync.Once
	lapsed chan struct{}
}

func lapseAfter(armed <-chan struct{}) func(uploader.Allocator) uploader.Allocator {
	return func(a uploader.Allocator) uploader.Allocator {
		return &lapsingRenew{Allocator: a, armed: armed, lapsed: make(chan struct{})}
	}
}

func (l *lapsingRenew) Renew(ctx context.Context, in *allocatorv1.RenewRequest, opts ...grpc.CallOption) (*allocatorv1.RenewResponse, error) {
	select {
	case <-l.armed:
	default:
		return l.Allocator.Renew(ctx, in, opts...)
	}
	l.once.Do(func() { close(l.lapsed) })
	return nil, status.Error(codes.FailedPrecondition, "reservation expired and the bucket has no room to grant it again")
}

// A single PUT whose reservation is lost while it runs is stopped: the
// upload ends UNAVAILABLE, nothing stays in the bucket and no capacity
// stays held.
func TestSlowPutStopsWhenItsReservationIsLost(t *testing.T) {
	const ttl = 2 * time.Second
	hp := hold(singlePut)
	defer close(hp.release)
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint},
		func(c *allocator.Config) { c.ReservationTTL = ttl },
		func(c *uploader.Config) { c.HTTPClient = hp },
		lapseAfter(hp.started))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1<<20)
	_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{Key: "slow/lost.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "lapsed") {
		t.Fatalf("upload whose reservation was lost mid-PUT: %v, want Unavailable saying it lapsed", err)
	}
	if objects, multiparts := st.objects(t); objects[st.Buckets[0].GetId()] != 0 || multiparts[st.Buckets[0].GetId()] != 0 {
		t.Fatalf("%v objects and %v open multipart uploads left", objects, multiparts)
	}
	st.waitNoReservations(t)
}

// A multipart upload whose reservation is lost while its completion is
// under way neither keeps nor commits the object: the upload ends
// UNAVAILABLE and leaves nothing behind. Before, a loss reported then was
// ignored and the object committed.
func TestReservationLostDuringCompleteLeavesNothing(t *testing.T) {
	const ttl = 2 * time.Second
	hc := hold(func(r *http.Request) bool { return r.Method == http.MethodPost && r.URL.Query().Has("uploadId") })
	var lr *lapsingRenew
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint},
		func(c *allocator.Config) { c.ReservationTTL = ttl },
		func(c *uploader.Config) { c.HTTPClient, c.PartSize = hc, 5<<20 },
		func(a uploader.Allocator) uploader.Allocator {
			lr = lapseAfter(hc.started)(a).(*lapsingRenew)
			return lr
		})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 6<<20) // two parts
	done := sendInBackground(ctx, st.Upload, &uploadv1.UploadHeader{Key: "slow/complete.bin", ContentType: "application/octet-stream"}, data)
	<-lr.lapsed // the Complete is held and a renewal found the reservation lost
	close(hc.release)
	if err := <-done; status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "lapsed") {
		t.Fatalf("upload whose reservation was lost during its completion: %v, want Unavailable saying it lapsed", err)
	}
	if objects, multiparts := st.objects(t); objects[st.Buckets[0].GetId()] != 0 || multiparts[st.Buckets[0].GetId()] != 0 {
		t.Fatalf("%v objects and %v open multipart uploads left", objects, multiparts)
	}
	st.waitNoReservations(t)
}

// An operator removes, disables or moves (points at another S3 bucket)
// the bucket a multipart upload is writing to: the next renewal learns
// it, and the upload stops there, aborting its parts, instead of sending
// the bucket every remaining part and a Complete only to remove the
// object at Commit. The client is told to retry.
func TestChangedBucketStopsItsUploads(t *testing.T) {
	for _, c := range []struct {
		name   string
		change func(ctx context.Context, st *stack, id string) error
		says   string
	}{
		{"removed", func(ctx context.Context, st *stack, id string) error {
			_, err := st.Admin.DeleteBucket(st.adminCtx(ctx), &adminv1.DeleteBucketRequest{Id: id})
			return err
		}, "was removed from bucketlb"},
		{"disabled", func(ctx context.Context, st *stack, id string) error {
			_, err := st.Admin.SetBucketState(st.adminCtx(ctx), &adminv1.SetBucketStateRequest{Id: id, State: adminv1.BucketState_BUCKET_STATE_DISABLED})
			return err
		}, "was disabled by an operator"},
		{"moved", func(ctx context.Context, st *stack, id string) error {
			_, err := st.Admin.PutBucket(st.adminCtx(ctx), &adminv1.PutBucketRequest{Bucket: &adminv1.BucketSpec{Id: id, Name: "elsewhere"},
				UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"name"}}})
			return err
		}, `was pointed at S3 bucket "elsewhere"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			const ttl = 2 * time.Second
			gw := testenv.S3(t).Endpoint
			st := startStackAt(t, []string{gw, gw},
				func(c *allocator.Config) { c.ReservationTTL = ttl },
				func(c *uploader.Config) { c.PartSize = 5 << 20 })
			first := st.Buckets[0]
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			data := testenv.OpaqueBytes(t, 12<<20)
			body := &gatedReader{r: bytes.NewReader(data), left: 6 << 20, open: make(chan struct{})}
			done := uploadInBackground(ctx, st.Upload, &uploadv1.UploadHeader{Key: "changed/big.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, body)
			// The first part is in; the second streams as the client sends it.
			parts := 0
			poll(t, 20*time.Second, "two parts under way", func() bool {
				parts += st.Proxies[first.GetName()].Counts()["UploadPart"]
				return parts == 2
			})
			if err := c.change(ctx, st, first.GetId()); err != nil {
				t.Fatal(err)
			}
			st.Proxies[first.GetName()].Counts() // from here on
			// The client is still holding back the rest: the service stops on
			// its own, within a renewal period.
			poll(t, 10*time.Second, "abort of the multipart upload", func() bool {
				_, multiparts := st.objects(t)
				return multiparts[first.GetId()] == 0
			})
			close(body.open)
			if err := <-done; status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), c.says) {
				t.Fatalf("upload to a bucket %s under it: %v, want Unavailable saying it %s", c.name, err, c.says)
			}
			after := st.Proxies[first.GetName()].Counts()
			if after["UploadPart"] != 0 || after["CompleteMultipartUpload"] != 0 {
				t.Fatalf("the %s bucket was sent %v after the change, want no parts and no Complete", c.name, after)
			}
			if objects, _ := st.objects(t); objects[first.GetId()] != 0 {
				t.Fatalf("%d objects left in the %s bucket", objects[first.GetId()], c.name)
			}
			if used, _ := st.usage(t); used[first.GetId()] != 0 {
				t.Fatalf("%d bytes counted on the %s bucket, want none", used[first.GetId()], c.name)
			}
		})
	}
}

// A client that goes while CreateMultipartUpload is on its way does not
// cut the create off, nor does the upload wait for it: the upload ends at
// once, its reservation goes back while the create's answer is still held,
// and once the answer comes, the upload it opened is aborted by its id.
// Before, the create was cancelled with the client, its id was lost, and
// under a client's key (which an abort by key could share with another
// writer) the open upload was left to the bucket's lifecycle rule, counted
// as a leftover. In between, the upload waited for the create's answer,
// holding its reservation, its idempotency key and its buffers for a
// client that had gone, up to the call timeout.
func TestClientGoneDuringTheCreateLeavesNoUpload(t *testing.T) {
	for _, hdr := range []*uploadv1.UploadHeader{
		{Key: "gone/create.bin", ContentType: "application/octet-stream"},
		{Key: "gone/create.bin", IdempotencyKey: "gone-create", ContentType: "application/octet-stream"},
	} {
		t.Run("idempotency key "+strconv.Quote(hdr.GetIdempotencyKey()), func(t *testing.T) {
			h := holdAnswer(createMultipart)
			watch, serverSawCancel := streamEnded()
			st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil,
				func(c *uploader.Config) { c.HTTPClient, c.PartSize = h, 5<<20 }, nil, watch)
			id := st.Buckets[0].GetId()
			data := testenv.OpaqueBytes(t, 11<<20)
			hdr.Size = int64(len(data))
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stream := openUpload(ctx, t, st.Upload, hdr, data[:1<<20])
			<-h.started
			cancel()
			if _, err := stream.CloseAndRecv(); status.Code(err) != codes.Canceled {
				t.Fatalf("the client that went: %v, want Canceled", err)
			}
			<-serverSawCancel
			st.waitNoReservations(t) // the create's answer is still held
			close(h.release)
			poll(t, 15*time.Second, "abort of the upload the create opened", func() bool {
				_, multiparts := st.objects(t)
				return multiparts[id] == 0
			})
			objects, _ := st.objects(t)
			if used, _ := st.usage(t); objects[id] != 0 || used[id] != 0 {
				t.Fatalf("%d objects, %d bytes used; want none", objects[id], used[id])
			}
			if n := strings.Count(st.Logs.String(), "leftover"); n != 0 {
				t.Fatalf("%d leftovers logged for an upload the service could abort:\n%s", n, st.Logs.String())
			}
		})
	}
}
