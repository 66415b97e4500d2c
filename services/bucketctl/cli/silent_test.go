package cli_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/bucketctl/cli"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
)

// silencingProxy forwards TCP to target until after bytes have come back
// from it; then it forwards nothing more back, holding its connections
// open: a peer gone silent (a partition, a frozen node), not one that
// closed.
func silencingProxy(t *testing.T, target string, after int64) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(done); lis.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			wg.Add(2)
			go func() { defer wg.Done(); _, _ = io.Copy(s, c) }()
			go func() {
				defer wg.Done()
				_, _ = io.CopyN(c, s, after)
				<-done // silent from here on, connections held open
				c.Close()
				s.Close()
			}()
		}
	}()
	return lis.Addr().String()
}

// A download whose server goes silent mid-stream ends with an error
// instead of waiting for good: bucketctl pings the connection (gRPC
// keepalive), and a peer that does not answer is given up on. Before,
// with no --timeout, it hung for as long as the process lived.
func TestTransferEndsWhenThePeerGoesSilent(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	data := e2e.RandomBytes(t, 16<<20)
	resp, err := uploadclient.Upload(ctx, env.Upload, &uploadv1.UploadHeader{NameHint: "big.bin", ContentType: "application/octet-stream", Size: int64(len(data))},
		bytes.NewReader(data), uploadclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	addr := silencingProxy(t, env.Stack.UploadAddr, 1<<20)
	var out, errOut bytes.Buffer
	root := cli.NewRoot(&out, &errOut)
	root.SetArgs([]string{"--upload-addr", addr, "get", "-q", resp.GetBucketId(), resp.GetKey(), "-o", t.TempDir() + "/back.bin"})
	start := time.Now()
	err = root.ExecuteContext(ctx)
	if err == nil || ctx.Err() != nil || !strings.Contains(err.Error(), "Unavailable") {
		t.Fatalf("get from a server gone silent: %v after %v, want Unavailable before the test's deadline", err, time.Since(start).Round(time.Second))
	}
}
