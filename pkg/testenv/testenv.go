// Package testenv starts the real parts tests run against: an embedded etcd
// per test and one process-wide S3 gateway (versitygw allows one per
// process) with a fresh bucket per test. Nothing here is a fake.
//
// The gateway changes the process working directory (see package s3gw):
// tests that read files must resolve absolute paths before calling S3.
package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/bucketlb/bucketlb/pkg/etcdclient"
	"github.com/bucketlb/bucketlb/pkg/etcdembed"
	"github.com/bucketlb/bucketlb/pkg/s3gw"
)

// Etcd starts a fresh embedded etcd for the test and returns it with a
// connected client. Both are closed when the test ends.
func Etcd(t testing.TB) (*etcdembed.Server, *clientv3.Client) {
	t.Helper()
	return EtcdWithQuota(t, 0)
}

// EtcdWithQuota is Etcd with a storage quota of quota bytes (0: etcd's
// default), for a test that fills it.
func EtcdWithQuota(t testing.TB, quota int64) (*etcdembed.Server, *clientv3.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := etcdembed.Start(ctx, etcdembed.Options{Dir: t.TempDir(), LogLevel: "fatal", QuotaBytes: quota})
	if err != nil {
		t.Fatalf("start embedded etcd: %v", err)
	}
	t.Cleanup(srv.Close)
	return srv, EtcdClient(t, srv.Endpoint)
}

// FillEtcd writes 256 KiB values under /filler/ until etcd refuses one
// for lack of space (its NOSPACE alarm is then raised).
func FillEtcd(ctx context.Context, t testing.TB, cli *clientv3.Client) {
	t.Helper()
	filler := strings.Repeat("x", 256<<10)
	for i := 0; ; i++ {
		_, err := cli.Put(ctx, fmt.Sprintf("/filler/%d", i), filler)
		if errors.Is(err, rpctypes.ErrNoSpace) {
			return
		}
		if err != nil || i > 1000 {
			t.Fatalf("filling etcd, put %d: %v", i, err)
		}
	}
}

// EtcdClient connects a new client to endpoint, closed when the test ends.
func EtcdClient(t testing.TB, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := etcdclient.New([]string{endpoint})
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

var (
	gwOnce    sync.Once
	gw        *s3gw.Gateway
	gwDir     string
	gwTLS     bool
	gwErr     error
	bucketSeq atomic.Int64
)

// notLeaks are goroutines that outlive the tests by design: the gateway's
// HTTP server (fasthttp keeps a clock goroutine for the process and lets
// its workers wind down on their own) and idle keep-alive connections of
// HTTP clients, which their transports close after their idle timeout.
var notLeaks = []goleak.Option{
	goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.updateServerDate.func1"),
	goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*workerPool).Start.func2"),
	goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*workerPool).getCh.func1"),
	goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
	goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
}

// Main runs a package's tests and then stops the process-wide gateway and
// removes its directory, which no single test owns: without it every run
// leaves the gateway's files in the temp directory. A run whose tests
// leave goroutines behind fails. Use it as
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
func Main(m *testing.M) {
	code := m.Run()
	if gw != nil {
		if err := gw.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "testenv:", err)
		}
	}
	// Every test has returned and the gateway is closed: a goroutine still
	// running now was leaked (an upload's part or renew loop, a stream's
	// paced receiver), which in a server is memory that never comes back.
	if code == 0 {
		if err := goleak.Find(notLeaks...); err != nil {
			fmt.Fprintln(os.Stderr, "testenv: goroutines leaked:", err)
			code = 1
		}
	}
	if gwDir != "" {
		// The TLS variant keeps its certificate beside the data directory.
		for _, d := range []string{gwDir, gwDir + "-tls"} {
			if err := os.RemoveAll(d); err != nil {
				fmt.Fprintln(os.Stderr, "testenv: remove gateway directory:", err)
			}
		}
	}
	os.Exit(code)
}

// S3 returns the process-wide plain-HTTP gateway, starting it on first use.
func S3(t testing.TB) *s3gw.Gateway { return shared(t, false) }

// S3TLS returns the process-wide gateway served over HTTPS with a
// self-signed certificate (Gateway.CAFile). A test binary uses either S3 or
// S3TLS, never both: versitygw runs once per process.
func S3TLS(t testing.TB) *s3gw.Gateway { return shared(t, true) }

func shared(t testing.TB, tls bool) *s3gw.Gateway {
	t.Helper()
	gwOnce.Do(func() {
		dir, err := os.MkdirTemp("", "bucketlb-s3gw-")
		if err != nil {
			gwErr = err
			return
		}
		gwDir = dir
		gwTLS = tls
		gw, gwErr = s3gw.Start(context.Background(), s3gw.Options{Dir: dir, TLS: tls})
	})
	if gwErr != nil {
		t.Fatalf("start s3 gateway: %v", gwErr)
	}
	if gwTLS != tls {
		t.Fatalf("this test binary already runs the gateway with TLS=%v; versitygw allows one gateway per process", gwTLS)
	}
	return gw
}

// NewBucketName returns a bucket name unique within the process, valid
// under S3 naming rules.
func NewBucketName(t testing.TB) string {
	name := strings.ToLower(t.Name())
	var b strings.Builder
	for _, r := range name {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	s := strings.Trim(b.String(), "-")
	if len(s) > 40 {
		s = s[:40]
	}
	return fmt.Sprintf("t%d-%s", bucketSeq.Add(1), strings.Trim(s, "-"))
}

// NewBucket creates a fresh bucket on g through the S3 API and returns its
// name.
func NewBucket(t testing.TB, g *s3gw.Gateway) string {
	t.Helper()
	name := NewBucketName(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := g.CreateBucket(ctx, name); err != nil {
		t.Fatalf("create bucket %s: %v", name, err)
	}
	return name
}
