// Package devstack runs all of bucketlb in one process with real parts:
// an embedded etcd server, the allocator, the upload service and a local
// S3 gateway (versitygw over a directory) holding three buckets. It is what
// `bucketctl dev` runs, and what the end-to-end tests start.
package devstack

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/etcdclient"
	"github.com/bucketlb/bucketlb/pkg/etcdembed"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/s3gw"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// CredentialsRef names the dev gateway's credentials in bucket specs.
const CredentialsRef = "DEV_S3"

// Options configure the stack. Zero values give `bucketctl dev` defaults;
// tests pass "127.0.0.1:0" addresses and a temporary DataDir.
type Options struct {
	// DataDir keeps etcd data, bucket contents and the admin token, so a
	// restarted stack finds its objects and usage again.
	DataDir string
	// S3Dir, if set, holds the bucket contents instead of DataDir/s3.
	S3Dir string
	// Listen addresses.
	EtcdAddr, AllocatorAddr, UploadAddr, S3Addr string
	// S3TLS serves the local S3 endpoint over HTTPS with a self-signed
	// certificate; the upload service then uses the SDK's default checksums
	// over TLS, the path R2 clients take.
	S3TLS bool
	// Buckets overrides the three default buckets.
	Buckets []*adminv1.BucketSpec
	// ReservationTTL overrides the allocator's reservation lifetime.
	ReservationTTL time.Duration
	// Logger receives the services' logs.
	Logger *slog.Logger
	// Endpoint, if set, rewrites the S3 endpoint of each default bucket;
	// fault tests put a fault-injecting proxy in front of one bucket.
	Endpoint func(bucketID, gatewayEndpoint string) string
	// Tune adjusts the services' configuration before they start.
	Tune func(*allocator.Config, *uploader.Config)
	// RateLimit is upload calls per second per client, RateBurst its
	// bucket size, as upload.rateLimit and upload.rateBurst; 0 is no limit
	// (tests), `bucketctl dev` takes the configuration's defaults.
	RateLimit float64
	RateBurst int
	// ClientInFlightBytes is upload.clientInFlightBytes; 0 (tests) is no
	// bound, `bucketctl dev` takes the configuration's default.
	ClientInFlightBytes int64
	// UploadTLS, if set, serves the upload API over TLS (mutual TLS when
	// it requires client certificates).
	UploadTLS *tls.Config
	// AllocatorTLS, if set, serves the allocator's APIs over TLS, and
	// AllocatorClientTLS is then how the upload service (and the test
	// environment's admin client) reaches them.
	AllocatorTLS, AllocatorClientTLS *tls.Config
}

// Stack is a running dev system.
type Stack struct {
	Etcd          *etcdembed.Server
	S3            *s3gw.Gateway
	EtcdClient    *clientv3.Client
	AllocatorAddr string
	UploadAddr    string
	AdminToken    string
	TokenFile     string
	// ServiceToken is what the upload service sends the allocator; it is
	// kept in the data dir as service-token, for an upload service run
	// outside the stack (BUCKETLB_SERVICE_TOKEN_FILE).
	ServiceToken string
	Buckets      []*adminv1.BucketSpec

	cancel  context.CancelFunc
	wg      sync.WaitGroup
	errMu   sync.Mutex
	runErr  error
	closers []func() error
}

// DefaultBuckets are three buckets with different priorities and small
// monthly limits, so spill-over to the next bucket is easy to see.
func DefaultBuckets(endpoint string) []*adminv1.BucketSpec {
	mk := func(id string, prio int32, limit int64) *adminv1.BucketSpec {
		return &adminv1.BucketSpec{
			Id: id, Name: id, Endpoint: endpoint, Region: s3gw.Region,
			CredentialsRef: CredentialsRef, MonthlyLimitBytes: limit, Priority: prio,
			Weight: 1, State: adminv1.BucketState_BUCKET_STATE_ACTIVE, PathStyle: true,
		}
	}
	return []*adminv1.BucketSpec{
		mk("dev-hot", 1, 64<<20),
		mk("dev-warm", 2, 256<<20),
		mk("dev-cold", 3, 1<<30),
	}
}

func (o *Options) defaults() error {
	if o.DataDir == "" {
		o.DataDir = ".data"
	}
	// Absolute before anything starts: the S3 gateway changes the working
	// directory (see package s3gw).
	abs, err := filepath.Abs(o.DataDir)
	if err != nil {
		return fmt.Errorf("devstack: data dir: %w", err)
	}
	o.DataDir = abs
	if o.S3Dir == "" {
		o.S3Dir = filepath.Join(abs, "s3")
	}
	if o.S3Dir, err = filepath.Abs(o.S3Dir); err != nil {
		return fmt.Errorf("devstack: s3 dir: %w", err)
	}
	def := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	def(&o.EtcdAddr, "127.0.0.1:23790")
	def(&o.AllocatorAddr, "127.0.0.1:7001")
	def(&o.UploadAddr, "127.0.0.1:7002")
	def(&o.S3Addr, "127.0.0.1:7070")
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return nil
}

// loadToken returns the token kept in dir under name ("admin-token"),
// creating it on first use.
func loadToken(dir, name string) (token, file string, err error) {
	file = filepath.Join(dir, name)
	if data, err := os.ReadFile(file); err == nil && len(strings.TrimSpace(string(data))) > 0 {
		return strings.TrimSpace(string(data)), file, nil
	}
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", "", err
	}
	token = hex.EncodeToString(b)
	if err := os.WriteFile(file, []byte(token+"\n"), 0o600); err != nil {
		return "", "", fmt.Errorf("devstack: write %s: %w", name, err)
	}
	return token, file, nil
}

// Start brings the whole stack up and returns when every part serves.
func Start(ctx context.Context, opts Options) (_ *Stack, err error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opts.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("devstack: create data dir: %w", err)
	}
	s := &Stack{}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if s.AdminToken, s.TokenFile, err = loadToken(opts.DataDir, "admin-token"); err != nil {
		return nil, err
	}
	if s.ServiceToken, _, err = loadToken(opts.DataDir, "service-token"); err != nil {
		return nil, err
	}

	s.Etcd, err = etcdembed.Start(ctx, etcdembed.Options{Dir: filepath.Join(opts.DataDir, "etcd"), ClientAddr: opts.EtcdAddr, LogLevel: "fatal"})
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, func() error { s.Etcd.Close(); return nil })
	s.EtcdClient, err = etcdclient.New([]string{s.Etcd.Endpoint})
	if err != nil {
		return nil, fmt.Errorf("devstack: etcd client: %w", err)
	}
	s.closers = append(s.closers, s.EtcdClient.Close)

	s.S3, err = s3gw.Start(ctx, s3gw.Options{Dir: opts.S3Dir, Addr: opts.S3Addr, TLS: opts.S3TLS})
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, s.S3.Close)

	s.Buckets = opts.Buckets
	if s.Buckets == nil {
		s.Buckets = DefaultBuckets(s.S3.Endpoint)
		if opts.Endpoint != nil {
			for _, b := range s.Buckets {
				b.Endpoint = opts.Endpoint(b.GetId(), s.S3.Endpoint)
			}
		}
	}
	for _, b := range s.Buckets {
		if err := s.S3.CreateBucket(ctx, b.GetName()); err != nil {
			return nil, err
		}
	}
	if opts.Buckets == nil && opts.Endpoint == nil {
		if err := s.followGateway(ctx); err != nil {
			return nil, err
		}
	}

	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.cancel = cancel
	if err := s.startServices(runCtx, opts); err != nil {
		return nil, err
	}
	return s, nil
}

// listenAndServe starts serve on addr in the background and returns the
// bound address.
func (s *Stack) listenAndServe(ctx context.Context, addr string, serve func(context.Context, net.Listener) error) (string, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("devstack: listen %s: %w", addr, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := serve(ctx, lis); err != nil {
			s.setErr(err)
		}
	}()
	return lis.Addr().String(), nil
}

func (s *Stack) setErr(err error) {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	if s.runErr == nil {
		s.runErr = err
	}
}

// Err returns the first error a background part reported, if any.
func (s *Stack) Err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.runErr
}

// Dial connects a plain-text gRPC client to addr, with opts.
func Dial(addr string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	return grpc.NewClient(addr, append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)...)
}

// Close stops the services (gracefully), then the gateway and etcd.
func (s *Stack) Close() error {
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
	var errs []error
	for i := len(s.closers) - 1; i >= 0; i-- {
		if err := s.closers[i](); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// StoredBuckets returns the buckets etcd holds, which are the ones in
// effect: the configured ones are only seeded on the first run.
func (s *Stack) StoredBuckets(ctx context.Context) ([]*adminv1.BucketSpec, error) {
	buckets, _, err := ledger.New(s.EtcdClient, ledger.Options{}).ListBuckets(ctx)
	if err != nil {
		return nil, fmt.Errorf("devstack: list buckets: %w", err)
	}
	return buckets, nil
}

// followGateway points the default buckets, as a data dir from an earlier
// run stored them, at this run's gateway: configured buckets are seeded
// once, so a gateway moved to another port (--s3-listen) would leave every
// bucket at the old one. Only an endpoint on a loopback address (an
// earlier dev gateway) is moved; one an operator set elsewhere stays.
func (s *Stack) followGateway(ctx context.Context) error {
	l := ledger.New(s.EtcdClient, ledger.Options{})
	for _, b := range s.Buckets {
		_, err := l.UpdateBucket(ctx, b.GetId(), func(cur *adminv1.BucketSpec) {
			if u, err := url.Parse(cur.GetEndpoint()); err == nil && cur.GetEndpoint() != b.GetEndpoint() {
				if ip := net.ParseIP(u.Hostname()); ip != nil && ip.IsLoopback() {
					cur.Endpoint = b.GetEndpoint()
				}
			}
		})
		if err != nil && !errors.Is(err, ledger.ErrBucketNotFound) {
			return fmt.Errorf("devstack: point %s at the gateway: %w", b.GetId(), err)
		}
	}
	return nil
}
