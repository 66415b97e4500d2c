package uploader_test

import (
	"context"
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

// Many uploads of one client over its rate limit all get through in
// their turn: each refusal says when a token is back, the client spreads
// its retries past that, and waiting for the limit does not use up the
// attempts kept for failures. 30 uploads at 5/s (burst 5) take about 5 s.
func TestRateLimitedUploadFilesWaitTheirTurn(t *testing.T) {
	lim := ratelimit.New(5, 5, nil)
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, nil, nil,
		grpc.ChainUnaryInterceptor(lim.Unary), grpc.ChainStreamInterceptor(lim.Stream))
	path := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(path, testenv.OpaqueBytes(t, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
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
