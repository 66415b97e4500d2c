package uploader_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/ratelimit"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

const (
	budgetPart = 5 << 20
	budget     = 2 * budgetPart // one large upload's two parts
)

// budgetStack is a one-bucket stack whose buffer budget holds one large
// upload, waiting up to wait for room.
func budgetStack(t *testing.T, wait time.Duration) *stack {
	t.Helper()
	return startStack(t, 1, func(c *uploader.Config) {
		c.PartSize, c.BufferBudget, c.BufferWait = budgetPart, budget, wait
	})
}

// Uploads beyond the buffer budget wait for room and then succeed: with
// room for one large upload's two parts, six large and six small uploads
// started at once all land intact, and the buffers held never exceed the
// budget.
func TestBufferBudgetQueuesUploads(t *testing.T) {
	st := budgetStack(t, 2*time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	data := make([][]byte, 12)
	resps := make([]*uploadv1.UploadResponse, len(data))
	errs := make([]error, len(data))
	for i := range data {
		size := 3*budgetPart - 1000 // three parts
		if i%2 == 1 {
			size = 300 << 10
		}
		data[i] = testenv.OpaqueBytes(t, size)
		wg.Go(func() {
			resps[i], errs[i] = send(ctx, st.Upload, &uploadv1.UploadHeader{Key: fmt.Sprintf("budget/%d.bin", i), ContentType: "application/octet-stream", Size: int64(size)}, data[i])
		})
	}
	wg.Wait()
	for i := range data {
		if errs[i] != nil {
			t.Fatalf("upload %d (%d bytes): %v", i, len(data[i]), errs[i])
		}
		readBack(ctx, t, st.Upload, resps[i], data[i], fmt.Sprintf("upload %d", i))
	}
	if peak := st.Server.BufferPeak(); peak <= 0 || peak > budget {
		t.Fatalf("upload buffers peaked at %d bytes; want 0 < peak <= budget %d", peak, budget)
	}
	if held := st.Server.BufferHeld(); held != 0 {
		t.Fatalf("%d bytes of upload buffers still held after every upload ended", held)
	}
}

// When the budget stays full for BufferWait, an upload fails with
// UNAVAILABLE and a retry delay before it reserves or stores anything, and
// succeeds once the room is back.
func TestBufferBudgetWaitRunsOut(t *testing.T) {
	st := budgetStack(t, 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// A large upload sends its first MiB and holds the whole budget.
	release := holdBudget(t, st)
	usedBefore, _ := st.usage(t)
	objectsBefore, _ := st.objects(t)

	data := testenv.OpaqueBytes(t, 1024)
	hdr := &uploadv1.UploadHeader{Key: "budget/late.bin", ContentType: "application/octet-stream", Size: int64(len(data))}
	_, err := send(ctx, st.Upload, hdr, data)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("upload with the budget full: %v, want UNAVAILABLE", err)
	}
	if !hasRetryInfo(err) {
		t.Fatalf("UNAVAILABLE without a retry delay: %v", status.Convert(err).Details())
	}
	if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != usedBefore[st.Buckets[0].GetId()] {
		t.Fatalf("usage moved from %v to %v for an upload turned away", usedBefore, used)
	}
	if objects, _ := st.objects(t); objects[st.Buckets[0].GetId()] != objectsBefore[st.Buckets[0].GetId()] {
		t.Fatalf("objects went from %v to %v for an upload turned away", objectsBefore, objects)
	}

	// The holder goes away; its room comes back and the retry lands.
	release()
	resp, err := send(ctx, st.Upload, hdr, data)
	if err != nil {
		t.Fatalf("retry after the budget freed: %v", err)
	}
	readBack(ctx, t, st.Upload, resp, data, "retried upload")
	st.waitNoReservations(t)
}

// An upload waiting for buffer room shows in bucketlb_upload_buffer_waiting
// (what the BucketlbUploadsWaitForBuffers alert reads) until it gets room.
func TestWaitingForBuffersIsMeasured(t *testing.T) {
	st, reg := startMeasuredStack(t, func(c *uploader.Config) {
		c.PartSize, c.BufferBudget, c.BufferWait = budgetPart, budget, time.Minute
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	waiting := func() float64 {
		v, _ := testenv.MetricValue(t, reg, "bucketlb_upload_buffer_waiting", nil)
		return v
	}
	release := holdBudget(t, st)
	data := testenv.OpaqueBytes(t, 1024)
	done := sendInBackground(ctx, st.Upload, &uploadv1.UploadHeader{Key: "budget/waiter.bin", ContentType: "application/octet-stream"}, data)
	for deadline := time.Now().Add(15 * time.Second); waiting() != 1; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("bucketlb_upload_buffer_waiting = %v while an upload waits, want 1", waiting())
		}
	}
	release()
	if err := <-done; err != nil {
		t.Fatalf("upload after the budget freed: %v", err)
	}
	if v := waiting(); v != 0 {
		t.Fatalf("bucketlb_upload_buffer_waiting = %v after the upload got room, want 0", v)
	}
}

// holdBudget starts a large upload, as another client than the test's own
// calls, that sends its first MiB and then waits, holding the whole buffer
// budget, until the returned function is called; that function returns
// once the budget is free again.
func holdBudget(t testing.TB, st *stack) (release func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(asClient(context.Background(), "budget-holder"))
	t.Cleanup(cancel)
	openUpload(ctx, t, st.Upload, &uploadv1.UploadHeader{Key: "budget/holder.bin", ContentType: "application/octet-stream", Size: 3 * budgetPart},
		testenv.OpaqueBytes(t, 1<<20))
	waitHeld(t, st, budget)
	return func() {
		cancel()
		waitHeld(t, st, 0)
	}
}

// asClient names the caller of ctx's calls, as a client without mTLS does.
func asClient(ctx context.Context, id string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, ratelimit.ClientIDKey, id)
}

// waitHeld polls until the server holds want bytes of upload buffers.
func waitHeld(t testing.TB, st *stack, want int64) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); st.Server.BufferHeld() != want; {
		if time.Now().After(deadline) {
			t.Fatalf("upload buffers held: %d bytes, want %d", st.Server.BufferHeld(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Reads share the buffer budget: with the budget full, GetObject waits and
// then answers UNAVAILABLE with a retry delay; once the room is back it
// reads, and gives its share back when done.
func TestBufferBudgetCoversReads(t *testing.T) {
	st := budgetStack(t, 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1024)
	resp, err := send(ctx, st.Upload, &uploadv1.UploadHeader{Key: "budget/read.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
	if err != nil {
		t.Fatal(err)
	}
	release := holdBudget(t, st)
	req := &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}
	_, _, err = read(ctx, st.Upload, req)
	if status.Code(err) != codes.Unavailable || !hasRetryInfo(err) {
		t.Fatalf("read with the budget full: %v, want UNAVAILABLE with a retry delay", err)
	}
	release()
	if _, got, err := read(ctx, st.Upload, req); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after the budget freed: %d bytes, %v", len(got), err)
	}
	waitHeld(t, st, 0)
}

func hasRetryInfo(err error) bool {
	for _, d := range status.Convert(err).Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok && r.GetRetryDelay().AsDuration() > 0 {
			return true
		}
	}
	return false
}

// One client cannot keep the others waiting: with the default share (a
// quarter of the budget, here less than one large upload's two parts), a
// client holding one idle large upload gets RESOURCE_EXHAUSTED with a
// retry delay for its next upload, which stores and counts nothing, while
// another client's uploads go through at once. When its stream ends the
// client uploads again, and no client is left tracked.
func TestClientShareKeepsRoomForOthers(t *testing.T) {
	st := startStack(t, 1, func(c *uploader.Config) {
		c.PartSize, c.BufferBudget, c.BufferWait = budgetPart, 36<<20, 300*time.Millisecond
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	greedy, other := asClient(ctx, "greedy"), asClient(ctx, "other")
	hctx, stopHolder := context.WithCancel(greedy)
	defer stopHolder()
	openUpload(hctx, t, st.Upload, &uploadv1.UploadHeader{Key: "share/holder.bin", ContentType: "application/octet-stream", Size: 3 * budgetPart},
		testenv.OpaqueBytes(t, 1<<20))
	waitHeld(t, st, 2*budgetPart)
	usedBefore, _ := st.usage(t)

	small := testenv.OpaqueBytes(t, 1024)
	_, err := send(greedy, st.Upload, &uploadv1.UploadHeader{Key: "share/greedy.bin", ContentType: "application/octet-stream", Size: int64(len(small))}, small)
	if status.Code(err) != codes.ResourceExhausted || !hasRetryInfo(err) || !strings.Contains(err.Error(), "share") {
		t.Fatalf("second upload of a client holding its share: %v, want RESOURCE_EXHAUSTED about its share, with a retry delay", err)
	}
	if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != usedBefore[st.Buckets[0].GetId()] {
		t.Fatalf("usage moved from %v to %v for an upload turned away", usedBefore, used)
	}
	if _, _, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: st.Buckets[0].GetId(), Key: "share/greedy.bin"}); status.Code(err) != codes.NotFound {
		t.Fatalf("read of the refused upload's key: %v, want NOT_FOUND", err)
	}

	large := testenv.OpaqueBytes(t, 3*budgetPart-1000)
	for name, data := range map[string][]byte{"share/other-small.bin": small, "share/other-large.bin": large} {
		resp, err := send(other, st.Upload, &uploadv1.UploadHeader{Key: name, ContentType: "application/octet-stream", Size: int64(len(data))}, data)
		if err != nil {
			t.Fatalf("another client's upload of %s: %v", name, err)
		}
		readBack(ctx, t, st.Upload, resp, data, name)
	}

	stopHolder()
	waitHeld(t, st, 0)
	resp, err := send(greedy, st.Upload, &uploadv1.UploadHeader{Key: "share/greedy.bin", ContentType: "application/octet-stream", Size: int64(len(small))}, small)
	if err != nil {
		t.Fatalf("the client's upload once its stream ended: %v", err)
	}
	readBack(ctx, t, st.Upload, resp, small, "greedy client's retry")
	if n := st.Server.BufferClients(); n != 0 {
		t.Fatalf("%d clients still tracked by the buffer budget after every call ended", n)
	}
	st.waitNoReservations(t)
}

// Uploads that fail through their client's own doing count as rejected in
// bucketlb_uploads_total, not as failures of the service, so a
// misbehaving client cannot trip the success-rate alert: one cut off for
// sending nothing, one asking for a resumable upload, one over its share
// of the buffers, and one under a running upload's idempotency key. The
// replica's own budget running out
// still counts as unavailable.
func TestCallerFaultsCountAsRejected(t *testing.T) {
	st, reg := startMeasuredStack(t, func(c *uploader.Config) {
		// The holders below idle for the rest of the test: it must end
		// before the idle timeout lets them go.
		c.PartSize, c.BufferBudget, c.BufferWait, c.IdleTimeout = budgetPart, 4*budgetPart, 300*time.Millisecond, 5*time.Second
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	count := func(outcome string) float64 {
		v, _ := testenv.MetricValue(t, reg, "bucketlb_uploads_total", map[string]string{"outcome": outcome})
		return v
	}
	expect := func(what string, err error, code codes.Code, rejected, unavailable float64) {
		t.Helper()
		if status.Code(err) != code {
			t.Fatalf("%s: %v, want %v", what, err, code)
		}
		for deadline := time.Now().Add(10 * time.Second); count("rejected") != rejected || count("unavailable") != unavailable; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("after %s: rejected %v, unavailable %v; want %v, %v", what, count("rejected"), count("unavailable"), rejected, unavailable)
			}
		}
	}
	small := testenv.OpaqueBytes(t, 1024)
	hdr := func(key string) *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{Key: key, IdempotencyKey: "k-" + key, ContentType: "application/octet-stream", Size: int64(len(small))}
	}

	idle := openUpload(ctx, t, st.Upload, hdr("faults/idle.bin"), nil)
	expect("an idle client", idle.RecvMsg(&uploadv1.UploadResponse{}), codes.DeadlineExceeded, 1, 0)
	// Asking for what the service does not offer (a resumable upload) is
	// the caller's doing too. Counted from here on one more.
	_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{Key: "faults/resumable.bin", ContentType: "application/octet-stream", Size: int64(len(small)), Resumable: true}, small)
	expect("a resumable upload", err, codes.Unimplemented, 2, 0)

	// A large upload holds the key, and its client's whole share.
	holder, stopHolder := context.WithCancel(asClient(ctx, "holder"))
	defer stopHolder()
	openUpload(holder, t, st.Upload, &uploadv1.UploadHeader{Key: "faults/held.bin", IdempotencyKey: "k-held", ContentType: "application/octet-stream", Size: 3 * budgetPart},
		testenv.OpaqueBytes(t, 1<<20))
	waitHeld(t, st, 2*budgetPart)
	waitReserved(t, st)
	_, err = send(ctx, st.Upload, &uploadv1.UploadHeader{Key: "faults/held.bin", IdempotencyKey: "k-held", ContentType: "application/octet-stream", Size: int64(len(small))}, small)
	expect("an upload under a running upload's key", err, codes.Aborted, 3, 0)
	_, err = send(asClient(ctx, "holder"), st.Upload, hdr("faults/share.bin"), small)
	expect("an upload over its client's share", err, codes.ResourceExhausted, 4, 0)

	// Another client fills the rest of the replica's budget: running out
	// of that is the service's failure.
	filler, stopFiller := context.WithCancel(asClient(ctx, "filler"))
	defer stopFiller()
	openUpload(filler, t, st.Upload, &uploadv1.UploadHeader{Key: "faults/filler.bin", ContentType: "application/octet-stream", Size: 3 * budgetPart},
		testenv.OpaqueBytes(t, 1<<20))
	waitHeld(t, st, 4*budgetPart)
	_, err = send(ctx, st.Upload, hdr("faults/full.bin"), small)
	expect("an upload into a full replica", err, codes.Unavailable, 4, 1)

	// The log says the same: the caller's faults at INFO, the service's
	// failure at WARN, each with its client and idempotency key.
	levels := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(st.Logs.String()), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil || rec["msg"] != "upload failed" {
			continue
		}
		key, _ := rec["key"].(string)
		levels[key] = fmt.Sprint(rec["level"])
		if key == "faults/share.bin" && (rec["client"] != "id:holder" || rec["idempotency_key"] != "k-faults/share.bin") {
			t.Fatalf("the log of an upload over its share: %v, want its client and idempotency key", rec)
		}
	}
	for key, want := range map[string]string{"faults/idle.bin": "INFO", "faults/share.bin": "INFO", "faults/full.bin": "WARN"} {
		if levels[key] != want {
			t.Fatalf("upload %s logged its failure at %q, want %s (all: %v)", key, levels[key], want, levels)
		}
	}
}

// waitReserved polls until the stack's bucket holds a reservation.
func waitReserved(t testing.TB, st *stack) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, reserved := st.usage(t); reserved[st.Buckets[0].GetId()] > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no upload reserved capacity within 15s")
		}
	}
}

// startMeasuredStack is a one-bucket stack whose upload service records
// its metrics into the returned registry.
func startMeasuredStack(t *testing.T, tune func(*uploader.Config)) (*stack, prometheus.Gatherer) {
	t.Helper()
	tel := newTelemetry(t, "upload-test")
	st := startStack(t, 1, func(c *uploader.Config) {
		tune(c)
		c.Metrics = tel.Metrics()
	})
	return st, tel.Registry()
}
