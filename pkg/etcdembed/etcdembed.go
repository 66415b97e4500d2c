// Package etcdembed runs a single-member etcd server in-process on loopback:
// the store of the dev stack and of every test that needs real etcd.
package etcdembed

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// Options configure the embedded server.
type Options struct {
	// Dir holds the etcd data. Required.
	Dir string
	// ClientAddr is the client listen address; empty means 127.0.0.1:0.
	ClientAddr string
	// LogLevel is etcd's zap level; empty means "error".
	LogLevel string
	// UnsafeNoFsync skips fsync. Only for benchmarks that must not measure
	// the disk; never for the dev stack.
	UnsafeNoFsync bool
	// QuotaBytes is the backend's storage quota; 0 keeps etcd's 2 GiB.
	// Tests set a small one to meet etcd's NOSPACE alarm.
	QuotaBytes int64
}

// Server is a running embedded etcd.
type Server struct {
	etcd   *embed.Etcd
	closed sync.Once
	// Endpoint is the client URL, e.g. http://127.0.0.1:40123.
	Endpoint string
}

// Start launches etcd and waits until it serves clients.
func Start(ctx context.Context, opts Options) (*Server, error) {
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("etcdembed: resolve data dir: %w", err)
	}
	cfg := embed.NewConfig()
	cfg.Name = "bucketlb"
	cfg.Dir = dir
	cfg.LogLevel = opts.LogLevel
	if cfg.LogLevel == "" {
		cfg.LogLevel = "error"
	}
	clientAddr := opts.ClientAddr
	if clientAddr == "" {
		clientAddr = "127.0.0.1:0"
	}
	cu, err := url.Parse("http://" + clientAddr)
	if err != nil {
		return nil, fmt.Errorf("etcdembed: bad client address %q: %w", clientAddr, err)
	}
	pu, _ := url.Parse("http://127.0.0.1:0")
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	// Auto-compaction is off by default in etcd; without it the history of
	// reservation keys grows until the backend quota raises NOSPACE. The
	// history is 0.8-1.4 KB per upload, so an hour of it at 1,000 uploads/s
	// would fill the 2 GiB quota: bucketlb's watches re-read what a
	// compaction took, and need no more than minutes of it.
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "5m"
	cfg.UnsafeNoFsync = opts.UnsafeNoFsync
	cfg.QuotaBackendBytes = opts.QuotaBytes

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcdembed: start: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcdembed: failed while starting: %w", err)
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, fmt.Errorf("etcdembed: not ready after 30s")
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	return &Server{etcd: e, Endpoint: "http://" + e.Clients[0].Addr().String()}, nil
}

// Close stops the server; closing it again does nothing (a test may stop
// etcd before its cleanup does).
func (s *Server) Close() {
	s.closed.Do(s.etcd.Close)
}

// Err reports a fatal server error after start.
func (s *Server) Err() <-chan error { return s.etcd.Err() }
