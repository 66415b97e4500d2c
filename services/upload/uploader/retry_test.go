package uploader_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// UploadFile retries an answer that asks for it (here UNAVAILABLE with a
// retry delay from a replica whose buffers are full), after the delay the
// server gave, and the file lands once.
func TestUploadFileRetriesWhenBusy(t *testing.T) {
	st := budgetStack(t, 100*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	release := holdBudget(t, st)

	data := testenv.OpaqueBytes(t, 4096)
	path := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	var retries []time.Duration
	resp, err := uploadclient.UploadFile(ctx, st.Upload, path, &uploadv1.UploadHeader{ContentType: "application/octet-stream", NameHint: "f.bin"},
		uploadclient.Options{OnRetry: func(attempt int, err error, wait time.Duration) {
			if status.Code(err) != codes.Unavailable {
				t.Errorf("retry %d after %v, want UNAVAILABLE", attempt, err)
			}
			retries = append(retries, wait)
			release() // room comes back before the retry
		}})
	if err != nil {
		t.Fatalf("upload: %v", err)
	}
	// The client adds up to half the server's delay at random, so that
	// callers refused together do not all come back together.
	if len(retries) != 1 || retries[0] < time.Second || retries[0] > 1500*time.Millisecond {
		t.Fatalf("retries waited %v; want one, of the server's 1s and up to half again", retries)
	}
	readBack(ctx, t, st.Upload, resp, data, "retried file")
	if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != int64(len(data)) {
		t.Fatalf("usage %v, want the file counted once (%d bytes)", used, len(data))
	}
}

// Answers that do not invite a retry are returned at once.
func TestUploadFileDoesNotRetryRejections(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	path := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(path, testenv.OpaqueBytes(t, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := uploadclient.UploadFile(ctx, st.Upload, path, &uploadv1.UploadHeader{ContentType: "application/x-msdownload", NameHint: "f.exe"},
		uploadclient.Options{OnRetry: func(attempt int, err error, _ time.Duration) { t.Errorf("retried a rejection: %v", err) }})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("disallowed type: %v, want INVALID_ARGUMENT", err)
	}
}

// lossyAllocator, while on, applies Commits but loses their answers, and
// once one is lost GetUploadRecord does not answer: the allocator's
// network failing for a while after an upload was stored and counted.
type lossyAllocator struct {
	uploader.Allocator
	on, lost atomic.Bool
}

func (l *lossyAllocator) Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error) {
	resp, err := l.Allocator.Commit(ctx, in, opts...)
	if l.on.Load() {
		l.lost.Store(true)
		return nil, status.Error(codes.Unavailable, "connection reset")
	}
	return resp, err
}

func (l *lossyAllocator) GetUploadRecord(ctx context.Context, in *allocatorv1.GetUploadRecordRequest, opts ...grpc.CallOption) (*allocatorv1.GetUploadRecordResponse, error) {
	if l.on.Load() && l.lost.Load() {
		return nil, status.Error(codes.Unavailable, "connection reset")
	}
	return l.Allocator.GetUploadRecord(ctx, in, opts...)
}

// An upload interrupted once every byte was sent (Ctrl-C, a deadline) may
// still be stored and counted: the service finishes the write and the
// Commit without its client. UploadFile then names the idempotency key it
// made up, and an upload under it returns the object, counted once.
// Hashing a file, before any byte is sent, stops at once when ctx ends.
func TestInterruptedUploadFileNamesItsIdempotencyKey(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 3<<20)
	path := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	hdr := &uploadv1.UploadHeader{ContentType: "application/octet-stream", NameHint: "f.bin"}
	interrupted, interrupt := context.WithCancel(ctx)
	_, err := uploadclient.UploadFile(interrupted, st.Upload, path, hdr, uploadclient.Options{Progress: func(sent int64) {
		if sent == int64(len(data)) {
			interrupt()
		}
	}})
	interrupt()
	var ue *uploadclient.UploadError
	if !errors.As(err, &ue) || ue.IdempotencyKey == "" {
		t.Fatalf("UploadFile interrupted after its last byte: %v, want an UploadError naming its idempotency key", err)
	}
	again := &uploadv1.UploadHeader{ContentType: "application/octet-stream", NameHint: "f.bin", IdempotencyKey: ue.IdempotencyKey}
	resp, err := uploadclient.UploadFile(ctx, st.Upload, path, again, uploadclient.Options{Retries: 20})
	if err != nil {
		t.Fatalf("upload again under the key: %v", err)
	}
	if used, _ := st.usage(t); sumOf(used) != int64(len(data)) {
		t.Fatalf("usage %v after the interrupted upload and its retry (replayed %v), want the file counted once (%d bytes)", used, resp.GetReplayed(), len(data))
	}
	cancelled, stop := context.WithCancel(ctx)
	stop()
	if _, err := uploadclient.UploadFile(cancelled, st.Upload, path, hdr, uploadclient.Options{}); !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "hash") {
		t.Fatalf("UploadFile with its context ended: %v, want the hashing stopped", err)
	}
}

// When UploadFile gives up, an attempt may have stored and counted the
// file (its Commit applied, the answer lost) although the last one failed
// otherwise: the error names the idempotency key it made up, and an
// upload under that key returns the stored object instead of storing and
// counting the file a second time.
func TestFailedUploadFileNamesItsIdempotencyKey(t *testing.T) {
	la := &lossyAllocator{}
	la.on.Store(true)
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, func(a uploader.Allocator) uploader.Allocator { la.Allocator = a; return la })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 4096)
	path := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	hdr := &uploadv1.UploadHeader{ContentType: "application/octet-stream", NameHint: "f.bin"}
	_, err := uploadclient.UploadFile(ctx, st.Upload, path, hdr, uploadclient.Options{})
	var ue *uploadclient.UploadError
	if !errors.As(err, &ue) || ue.IdempotencyKey == "" || status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), ue.IdempotencyKey) {
		t.Fatalf("UploadFile with the allocator's answers lost: %v, want an UploadError naming its idempotency key", err)
	}
	la.on.Store(false)
	again := &uploadv1.UploadHeader{ContentType: "application/octet-stream", NameHint: "f.bin", IdempotencyKey: ue.IdempotencyKey}
	resp, err := uploadclient.UploadFile(ctx, st.Upload, path, again, uploadclient.Options{})
	if err != nil || !resp.GetReplayed() {
		t.Fatalf("upload again under the key: %v, %v; want the stored object replayed", resp, err)
	}
	if used, _ := st.usage(t); used[st.Buckets[0].GetId()] != int64(len(data)) {
		t.Fatalf("usage %v, want the file counted once (%d bytes)", used, len(data))
	}
}

// failingReader hands out n bytes, then fails.
type failingReader struct{ n int }

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n == 0 {
		return 0, errors.New("disk read error")
	}
	k := min(len(p), f.n)
	f.n -= k
	return k, nil
}

// An upload whose input fails ends its stream at once, so the server lets
// go of its reservation and multipart upload then, not after its idle
// timeout (a minute here) or never.
func TestUploadWhoseInputFailsEndsItsStream(t *testing.T) {
	st := startStack(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	hdr := &uploadv1.UploadHeader{ContentType: "application/octet-stream", NameHint: "f.bin", Size: 20 << 20} // multipart
	if _, err := uploadclient.Upload(ctx, st.Upload, hdr, &failingReader{n: 1 << 20}, uploadclient.Options{}); err == nil || !strings.Contains(err.Error(), "disk read error") {
		t.Fatalf("upload from a failing input: %v", err)
	}
	st.waitNoReservations(t)
	if _, multiparts := st.objects(t); multiparts[st.Buckets[0].GetId()] != 0 {
		t.Fatalf("%v open multipart uploads left", multiparts)
	}
}
