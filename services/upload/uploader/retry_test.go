package uploader_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
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
	if len(retries) != 1 || retries[0] != time.Second {
		t.Fatalf("retries waited %v; want one, of the server's 1s", retries)
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
