package devstack

import (
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/grpcserver"
	"github.com/bucketlb/bucketlb/pkg/mimecheck"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/ratelimit"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// startServices runs the allocator and the upload service on their own
// gRPC servers, wired to each other over real loopback gRPC.
func (s *Stack) startServices(ctx context.Context, opts Options) error {
	log := opts.Logger
	acfg := allocator.Config{
		Buckets:        s.Buckets,
		AdminToken:     s.AdminToken,
		ServiceToken:   s.ServiceToken,
		ReservationTTL: opts.ReservationTTL,
	}
	ucfg := uploader.Config{
		Credentials: objstore.StaticCredentials{CredentialsRef: {s.S3.AccessKey, s.S3.SecretKey}},
		CAFile:      s.S3.CAFile,
		// Over TLS keep the SDK's default checksums: the path R2 clients take.
		SDKDefaultChecksums: opts.S3TLS,
		// The dev stack also takes arbitrary binary files (e.g. random test
		// data); production keeps the images-and-documents default.
		AllowedContentTypes: append([]string{"application/octet-stream"}, mimecheck.DefaultAllowed...),
	}
	probeStore, err := objstore.New(objstore.Options{Credentials: ucfg.Credentials, CAFile: s.S3.CAFile})
	if err != nil {
		return err
	}
	s.closers = append(s.closers, func() error { probeStore.Close(); return nil })
	acfg.ProbeStore = probeStore
	ucfg.ClientInFlightBytes = opts.ClientInFlightBytes
	if opts.Tune != nil {
		opts.Tune(&acfg, &ucfg)
	}
	alloc, err := allocator.New(ctx, s.EtcdClient, acfg, log.With("service", "allocator"))
	if err != nil {
		return fmt.Errorf("devstack: allocator: %w", err)
	}
	s.closers = append(s.closers, alloc.Close)
	unary, stream := alloc.Interceptors()
	var aopts []grpc.ServerOption
	if opts.AllocatorTLS != nil {
		aopts = append(aopts, grpc.Creds(credentials.NewTLS(opts.AllocatorTLS)))
	}
	asrv := grpcserver.New(grpcserver.Options{
		Logger: log.With("service", "allocator"), StopTimeout: 5 * time.Second, ServerOptions: aopts,
		UnaryInterceptors: []grpc.UnaryServerInterceptor{unary}, StreamInterceptors: []grpc.StreamServerInterceptor{stream},
	})
	alloc.Register(asrv.GRPC)
	asrv.SetServing("bucketlb.allocator.v1.AllocatorService", "bucketlb.admin.v1.AdminService")
	// The allocator stops once the upload service has: uploads still
	// draining when the stack stops (Ctrl-C in make run) must reach it for
	// their Commit, or their objects are removed. In production the two
	// are separate deployments, each drained on its own.
	allocCtx, stopAlloc := context.WithCancel(context.WithoutCancel(ctx))
	uploadStopped := make(chan struct{})
	uploadServing := false
	defer func() {
		if !uploadServing {
			close(uploadStopped)
		}
	}()
	go func() {
		<-ctx.Done()
		<-uploadStopped
		stopAlloc()
	}()
	if s.AllocatorAddr, err = s.listenAndServe(allocCtx, opts.AllocatorAddr, func(ctx context.Context, lis net.Listener) error {
		return alloc.Serve(ctx, asrv, lis)
	}); err != nil {
		return err
	}

	// The upload service's connection is wired as in production.
	dopts := uploader.AllocatorDialOptions(s.ServiceToken)
	if opts.AllocatorTLS != nil {
		dopts = append(dopts, grpc.WithTransportCredentials(credentials.NewTLS(opts.AllocatorClientTLS)))
	}
	conn, err := Dial(s.AllocatorAddr, dopts...)
	if err != nil {
		return fmt.Errorf("devstack: dial allocator: %w", err)
	}
	s.closers = append(s.closers, conn.Close)
	up, err := uploader.New(ucfg, allocatorv1.NewAllocatorServiceClient(conn), log.With("service", "upload"))
	if err != nil {
		return fmt.Errorf("devstack: upload service: %w", err)
	}
	s.closers = append(s.closers, up.Close)
	uopts := up.ServerOptions()
	if opts.UploadTLS != nil {
		uopts = append(uopts, grpc.Creds(credentials.NewTLS(opts.UploadTLS)))
	}
	sopts := grpcserver.Options{Logger: log.With("service", "upload"), StopTimeout: 30 * time.Second, ServerOptions: uopts}
	if opts.RateLimit > 0 {
		// As the upload service's main installs it.
		lim := ratelimit.New(opts.RateLimit, max(opts.RateBurst, 1), nil)
		sopts.UnaryInterceptors = append(sopts.UnaryInterceptors, lim.Unary)
		sopts.StreamInterceptors = append(sopts.StreamInterceptors, lim.Stream)
	}
	usrv := grpcserver.New(sopts)
	up.Register(usrv.GRPC)
	usrv.SetServing("bucketlb.upload.v1.UploadService")
	if s.UploadAddr, err = s.listenAndServe(ctx, opts.UploadAddr, func(ctx context.Context, lis net.Listener) error {
		defer close(uploadStopped)
		return usrv.Serve(ctx, lis)
	}); err != nil {
		return err
	}
	uploadServing = true
	return nil
}
