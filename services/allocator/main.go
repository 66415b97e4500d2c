// Command allocator runs bucketlb's control plane: it picks buckets,
// reserves capacity in etcd, records usage once and serves the admin API.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"os/signal"
	"slices"
	"syscall"
	"time"

	"github.com/KimMachineGun/automemlimit/memlimit"
	"google.golang.org/grpc"

	"github.com/bucketlb/bucketlb/pkg/auth"
	"github.com/bucketlb/bucketlb/pkg/config"
	"github.com/bucketlb/bucketlb/pkg/etcdclient"
	"github.com/bucketlb/bucketlb/pkg/grpcserver"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/placement"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
	"github.com/bucketlb/bucketlb/pkg/tlsfiles"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if err := run(log); err != nil {
		log.Error("allocator stopped", "error", err.Error())
		os.Exit(1)
	}
}

func run(log *slog.Logger) error {
	cfgPath := flag.String("config", "", "YAML config file (optional; BUCKETLB_* and R2_* environment variables override)")
	metricsListen := flag.String("metrics-listen", ":9090", "HTTP address for /metrics and /healthz (empty disables)")
	listen := flag.String("listen", "", "gRPC listen address (overrides allocator.listen)")
	flag.Parse()

	// The GC's soft limit at 90 % of the container's memory limit, unless
	// GOMEMLIMIT is set: near it the GC works harder instead of the kernel
	// killing the pod mid-upload. Outside a container there is no limit.
	if limit, err := memlimit.Set(); err != nil {
		log.Debug("no memory limit for the GC", "error", err.Error())
	} else if limit < math.MaxInt64 {
		log.Info("GC memory limit", "bytes", limit)
	}
	cfg, err := config.Load(*cfgPath, os.Getenv)
	if err != nil {
		return err
	}
	if *listen != "" {
		cfg.Allocator.Listen = *listen
	}
	token, err := auth.LoadToken("BUCKETLB_ADMIN_TOKEN", "allocator.adminTokenFile (BUCKETLB_ADMIN_TOKEN_FILE)", cfg.Allocator.AdminTokenFile)
	if err != nil {
		return err
	}
	serviceToken, err := auth.LoadToken("BUCKETLB_SERVICE_TOKEN", "allocator.serviceTokenFile (BUCKETLB_SERVICE_TOKEN_FILE)", cfg.Allocator.ServiceTokenFile)
	if err != nil {
		return err
	}
	strategy, err := placement.Parse(cfg.Allocator.Strategy)
	if err != nil {
		return fmt.Errorf("config: allocator.strategy: %w", err)
	}
	specs, err := cfg.Specs()
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	tel, err := telemetry.StartService(ctx, "bucketlb-allocator", version, *metricsListen, log)
	if err != nil {
		return err
	}
	// Shut down after the servers that record through it have stopped.
	defer func() { _ = tel.Shutdown(context.WithoutCancel(ctx)) }()

	cli, err := etcdclient.New(cfg.Allocator.EtcdEndpoints)
	if err != nil {
		return fmt.Errorf("etcd client: %w", err)
	}
	// The etcd client outlives the servers that use it.
	defer cli.Close()

	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	acfg := allocator.Config{
		Buckets:        specs,
		AdminToken:     token,
		ServiceToken:   serviceToken,
		ReservationTTL: cfg.Allocator.ReservationTTL.D(),
		IdempotencyTTL: cfg.Allocator.IdempotencyTTL.D(),
		Strategy:       strategy,
		ResetDay:       cfg.Allocator.PeriodResetDay,
		ProbeEvery:     cfg.Allocator.ProbeInterval.D(),
		Metrics:        tel.Metrics(),
	}
	if cfg.Allocator.ProbeBuckets {
		store, err := objstore.New(objstore.Options{Credentials: objstore.EnvCredentials{Dir: cfg.Allocator.CredentialsDir}, CAFile: cfg.Upload.CAFile})
		if err != nil {
			return err
		}
		acfg.ProbeStore = store
	}
	alloc, err := allocator.New(startCtx, cli, acfg, log)
	if err != nil {
		return err
	}
	defer alloc.Close()

	t := cfg.Allocator.TLS
	tlsOpts, err := tlsfiles.ServerOptions(t.CertFile, t.KeyFile, t.ClientCAFile, log)
	if err != nil {
		return fmt.Errorf("allocator.tls: %w", err)
	}
	unary, stream := alloc.Interceptors()
	srv := grpcserver.New(grpcserver.Options{
		Logger:           log,
		DrainDelay:       2 * time.Second,
		StopTimeout:      cfg.Allocator.StopTimeout.D(),
		MaxConnectionAge: 5 * time.Minute,
		// Its calls are short: one still running after this is stuck.
		MaxConnectionAgeGrace: cfg.Allocator.StopTimeout.D(),
		ServerOptions:         slices.Concat(tel.ServerOptions(), tlsOpts),
		UnaryInterceptors:     []grpc.UnaryServerInterceptor{unary},
		StreamInterceptors:    []grpc.StreamServerInterceptor{stream},
	})
	alloc.Register(srv.GRPC)
	srv.SetServing("bucketlb.allocator.v1.AllocatorService", "bucketlb.admin.v1.AdminService")
	lis, err := net.Listen("tcp", cfg.Allocator.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	log.Info("allocator serving", "addr", lis.Addr().String(), "etcd", cfg.Allocator.EtcdEndpoints, "strategy", cfg.Allocator.Strategy,
		"tls", t.CertFile != "", "mtls", t.ClientCAFile != "")

	serveErr := alloc.Serve(ctx, srv, lis)
	if serveErr != nil && !errors.Is(serveErr, context.Canceled) {
		return serveErr
	}
	log.Info("allocator stopped cleanly")
	return nil
}
