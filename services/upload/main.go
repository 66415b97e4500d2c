// Command upload runs bucketlb's data plane: clients stream files to it
// over gRPC and it stores them in the bucket the allocator picks.
package main

import (
	"context"
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
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/auth"
	"github.com/bucketlb/bucketlb/pkg/config"
	"github.com/bucketlb/bucketlb/pkg/grpcserver"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/ratelimit"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
	"github.com/bucketlb/bucketlb/pkg/tlsfiles"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if err := run(log); err != nil {
		log.Error("upload service stopped", "error", err.Error())
		os.Exit(1)
	}
}

func run(log *slog.Logger) error {
	cfgPath := flag.String("config", "", "YAML config file (optional; BUCKETLB_* environment variables override)")
	metricsListen := flag.String("metrics-listen", ":9090", "HTTP address for /metrics and /healthz (empty disables)")
	listen := flag.String("listen", "", "gRPC listen address (overrides upload.listen)")
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
	if err := cfg.CheckAllocatorTLS(); err != nil {
		return err
	}
	if *listen != "" {
		cfg.Upload.Listen = *listen
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	tel, err := telemetry.StartService(ctx, "bucketlb-upload", version, *metricsListen, log)
	if err != nil {
		return err
	}
	// Shut down after the servers that record through it have stopped.
	defer func() { _ = tel.Shutdown(context.WithoutCancel(ctx)) }()

	serviceToken, err := auth.LoadToken("BUCKETLB_SERVICE_TOKEN", "upload.serviceTokenFile (BUCKETLB_SERVICE_TOKEN_FILE)", cfg.Upload.ServiceTokenFile)
	if err != nil {
		return err
	}
	at := cfg.Upload.AllocatorTLS
	allocCreds, err := tlsfiles.DialCredentials(at.Enabled, at.CAFile, at.CertFile, at.KeyFile, at.ServerName, log)
	if err != nil {
		return fmt.Errorf("upload.allocatorTLS: %w", err)
	}
	conn, err := grpc.NewClient(cfg.Upload.AllocatorAddr, slices.Concat([]grpc.DialOption{
		grpc.WithTransportCredentials(allocCreds),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second}),
	}, uploader.AllocatorDialOptions(serviceToken), tel.DialOptions())...)
	if err != nil {
		return fmt.Errorf("allocator client: %w", err)
	}
	defer conn.Close()

	var tracer trace.TracerProvider
	if tel.TracesExported() {
		tracer = tel.TracerProvider()
	}
	up, err := uploader.New(uploader.Config{
		MaxObjectSize:       int64(cfg.Upload.MaxObjectSize),
		AllowedContentTypes: cfg.Upload.AllowedContentTypes,
		MaxBucketAttempts:   cfg.Upload.MaxBucketAttempts,
		Credentials:         objstore.EnvCredentials{Dir: cfg.Upload.CredentialsDir},
		CAFile:              cfg.Upload.CAFile,
		BufferParts:         cfg.Upload.BufferParts,
		BufferBudget:        int64(cfg.Upload.BufferBudget),
		ClientBufferShare:   int64(cfg.Upload.ClientBufferShare),
		ClientInFlightBytes: int64(cfg.Upload.ClientInFlightBytes),
		BufferWait:          cfg.Upload.BufferWait.D(),
		IdleTimeout:         cfg.Upload.IdleTimeout.D(),
		MinDataRate:         minDataRate(int64(cfg.Upload.MinDataRate)),
		Metrics:             tel.Metrics(),
		TracerProvider:      tracer,
	}, allocatorv1.NewAllocatorServiceClient(conn), log)
	if err != nil {
		return err
	}
	defer up.Close()

	opts := grpcserver.Options{
		Logger:           log,
		DrainDelay:       2 * time.Second,
		StopTimeout:      cfg.Upload.StopTimeout.D(),
		MaxConnectionAge: 10 * time.Minute,
		ServerOptions:    append(tel.ServerOptions(), up.ServerOptions()...),
	}
	t := cfg.Upload.TLS
	tlsOpts, err := tlsfiles.ServerOptions(t.CertFile, t.KeyFile, t.ClientCAFile, log)
	if err != nil {
		return fmt.Errorf("upload.tls: %w", err)
	}
	opts.ServerOptions = append(opts.ServerOptions, tlsOpts...)
	if cfg.Upload.RateLimit > 0 {
		lim := ratelimit.New(cfg.Upload.RateLimit, max(cfg.Upload.RateBurst, 1), nil)
		opts.UnaryInterceptors = append(opts.UnaryInterceptors, lim.Unary)
		opts.StreamInterceptors = append(opts.StreamInterceptors, lim.Stream)
	}
	srv := grpcserver.New(opts)
	up.Register(srv.GRPC)
	srv.SetServing("bucketlb.upload.v1.UploadService")
	lis, err := net.Listen("tcp", cfg.Upload.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	log.Info("upload service serving", "addr", lis.Addr().String(), "allocator", cfg.Upload.AllocatorAddr,
		"tls", cfg.Upload.TLS.CertFile != "", "mtls", cfg.Upload.TLS.ClientCAFile != "", "allocator_tls", at.Enabled)
	if err := srv.Serve(ctx, lis); err != nil {
		return err
	}
	log.Info("upload service stopped cleanly")
	return nil
}

// minDataRate maps the config's 0 (check off) to the uploader's negative.
func minDataRate(r int64) int64 {
	if r == 0 {
		return -1
	}
	return r
}
