package uploader_test

import (
	"context"
	"errors"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/ratelimit"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
)

// rateLimitedStack is a stack whose upload service runs lim, and a
// 1000-byte file to upload.
func rateLimitedStack(t *testing.T, lim *ratelimit.Limiter) (*stack, string) {
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, nil,
		grpc.ChainUnaryInterceptor(lim.Unary), grpc.ChainStreamInterceptor(lim.Stream))
	path := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(path, testenv.OpaqueBytes(t, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	return st, path
}

// Many uploads of one client over its rate limit all get through in
// their turn: each refusal says when a token is back, the client spreads
// its retries past that, and waiting for the limit does not use up the
// attempts kept for failures. 30 uploads at 5/s (burst 5) take about 5 s.
func TestRateLimitedUploadFilesWaitTheirTurn(t *testing.T) {
	st, path := rateLimitedStack(t, ratelimit.New(5, 5, nil))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var refused atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, 30)
	for i := range errs {
		wg.Go(func() {
			_, errs[i] = uploadclient.UploadFile(ctx, st.Upload, path, &uploadv1.UploadHeader{NameHint: "f.bin", ContentType: "application/octet-stream"},
				uploadclient.Options{OnRetry: func(call int, _ error, _ time.Duration) {
					refused.Add(1)
					if call < 1 {
						t.Errorf("retry after call %d; calls count from 1, refusals included", call)
					}
				}})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("upload %d: %v", i, err)
		}
	}
	if refused.Load() == 0 {
		t.Fatal("the rate limit never refused an upload: the test proves nothing")
	}
}

// RateLimitWait < 0 means no waiting for the rate limit: a refusal by it
// fails the upload at once, naming the limit, with no retry.
func TestNoWaitingForTheRateLimit(t *testing.T) {
	st, path := rateLimitedStack(t, ratelimit.New(0.01, 1, nil)) // one call, then none for 100 s
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	hdr := &uploadv1.UploadHeader{NameHint: "f.bin", ContentType: "application/octet-stream"}
	if _, err := uploadclient.UploadFile(ctx, st.Upload, path, hdr, uploadclient.Options{}); err != nil {
		t.Fatal(err)
	}
	retries := 0
	_, err := uploadclient.UploadFile(ctx, st.Upload, path, hdr, uploadclient.Options{RateLimitWait: -1,
		OnRetry: func(int, error, time.Duration) { retries++ }})
	var ue *uploadclient.UploadError
	if !errors.As(err, &ue) || ue.Attempts != 1 || retries != 0 || status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("upload over the rate limit without waiting: %v after %d retries, want RESOURCE_EXHAUSTED at the first attempt", err, retries)
	}
}
