// Package grpcserver runs a gRPC server the way every bucketlb service
// needs it: grpc.health.v1 and reflection registered, panics turned into
// Internal errors, and an ordered shutdown (NOT_SERVING first, then a
// bounded GracefulStop, then Stop) when the context ends.
package grpcserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	// Clients may compress their messages with gzip (grpc-go's
	// UseCompressor, grpc-java's and others' settings); without the
	// codec every such call ended UNIMPLEMENTED. Replies to them are
	// compressed the same way. Decompressed messages are still held to
	// the receive size limit.
	_ "google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// streamWorkers is how many goroutines gRPC keeps to run handlers. A
// reused goroutine keeps the stack it grew: a fresh one per stream grows
// its stack again on every request, which cost 5 % of the CPU of a 1 KiB
// upload (the S3 SDK's middleware runs deep). When all are busy, gRPC
// starts a goroutine as it does without workers, so a slow handler never
// queues another; idle, each costs one parked goroutine.
const streamWorkers = 64

// Options tune the server.
type Options struct {
	// Logger receives lifecycle and panic logs. Required.
	Logger *slog.Logger
	// DrainDelay is how long the server stays up answering NOT_SERVING
	// before it stops accepting streams, so load balancers notice first.
	DrainDelay time.Duration
	// StopTimeout bounds GracefulStop; in-flight streams still running then
	// are cut. Keep it shorter than the pod's termination grace period.
	StopTimeout time.Duration
	// CleanupTimeout bounds how long Shutdown then waits for the cut
	// streams' handlers to return. They clean up (abort a multipart
	// upload, give a reservation back), which a process that exits first
	// leaves to the janitor and the lease TTL; but one that hangs must not
	// hold the process until it is killed. Default 5s; DrainDelay +
	// StopTimeout + CleanupTimeout must fit the termination grace period.
	CleanupTimeout time.Duration
	// MaxConnectionAge spreads clients over new replicas after a scale-up
	// (the DNS resolver does not poll). Zero disables it.
	MaxConnectionAge time.Duration
	// MaxConnectionAgeGrace bounds how long calls already running on a
	// connection past MaxConnectionAge may go on (new calls go to a new
	// connection at once). Zero: no bound, as an upload of gigabytes must
	// not be cut only because its connection is old.
	MaxConnectionAgeGrace time.Duration
	// ServerOptions are appended (interceptors, stats handlers, creds...).
	ServerOptions []grpc.ServerOption
	// UnaryInterceptors and StreamInterceptors run after panic recovery.
	UnaryInterceptors  []grpc.UnaryServerInterceptor
	StreamInterceptors []grpc.StreamServerInterceptor
}

// Server wraps a grpc.Server with its health service.
type Server struct {
	GRPC   *grpc.Server
	Health *health.Server
	opts   Options
}

// New builds a server with health and reflection registered. Register the
// application services on s.GRPC before calling Serve.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 25 * time.Second
	}
	if opts.CleanupTimeout == 0 {
		opts.CleanupTimeout = 5 * time.Second
	}
	rec := recoverer{log: opts.Logger}
	sopts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(append([]grpc.UnaryServerInterceptor{rec.unary}, opts.UnaryInterceptors...)...),
		grpc.ChainStreamInterceptor(append([]grpc.StreamServerInterceptor{rec.stream}, opts.StreamInterceptors...)...),
		// Clients may ping every 20 s (see dial options in the clients);
		// the default 5 min minimum would answer them with GOAWAY.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.NumStreamWorkers(streamWorkers),
	}
	if opts.MaxConnectionAge > 0 {
		sopts = append(sopts, grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionAge:      opts.MaxConnectionAge,
			MaxConnectionAgeGrace: opts.MaxConnectionAgeGrace, // gRPC takes zero as infinite
		}))
	}
	sopts = append(sopts, opts.ServerOptions...)
	g := grpc.NewServer(sopts...)
	h := health.NewServer()
	healthpb.RegisterHealthServer(g, h)
	reflection.Register(g)
	return &Server{GRPC: g, Health: h, opts: opts}
}

// SetServing marks the named services (and the overall server, "") SERVING.
func (s *Server) SetServing(services ...string) {
	s.Health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	for _, name := range services {
		s.Health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
}

// Serve serves on lis until ctx ends, then shuts down in order: health
// NOT_SERVING, DrainDelay, GracefulStop bounded by StopTimeout, Stop, and
// at most CleanupTimeout for the cut handlers to return.
// It returns nil after a shutdown caused by ctx.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- s.GRPC.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("grpc serve on %s: %w", lis.Addr(), err)
	case <-ctx.Done():
	}
	if !s.Shutdown() {
		return nil // gRPC's Serve returns only once the handlers have
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("grpc serve on %s: %w", lis.Addr(), err)
	}
	return nil
}

// Shutdown performs the ordered stop. Safe to call more than once. It
// reports false when it gave up on handlers still running.
func (s *Server) Shutdown() (stopped bool) {
	log := s.opts.Logger
	s.Health.Shutdown() // every service NOT_SERVING
	if s.opts.DrainDelay > 0 {
		time.Sleep(s.opts.DrainDelay)
	}
	done := make(chan struct{})
	go func() { s.GRPC.GracefulStop(); close(done) }()
	if within(done, s.opts.StopTimeout) {
		log.Info("grpc server stopped gracefully")
		return true
	}
	log.Warn("grpc graceful stop timed out; cutting remaining streams", "timeout", s.opts.StopTimeout)
	// GracefulStop (done) returns once every connection's handlers have
	// returned, which Stop's cancelling hurries along.
	go s.GRPC.Stop()
	if within(done, s.opts.CleanupTimeout) {
		log.Info("cut streams' handlers returned")
		return true
	}
	log.Error("handlers of cut streams still running; stopping without them", "timeout", s.opts.CleanupTimeout)
	return false
}

// within reports whether done closes within d.
func within(done <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

type recoverer struct{ log *slog.Logger }

func (r recoverer) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer r.recover(info.FullMethod, &err)
	return handler(ctx, req)
}

func (r recoverer) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer r.recover(info.FullMethod, &err)
	return handler(srv, ss)
}

func (r recoverer) recover(method string, err *error) {
	if p := recover(); p != nil {
		r.log.Error("panic in handler", "method", method, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
		*err = status.Error(codes.Internal, "internal error: the server hit a bug handling this request; it has been logged")
	}
}
