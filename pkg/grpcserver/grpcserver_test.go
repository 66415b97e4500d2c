package grpcserver_test

import (
	"context"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/bucketlb/bucketlb/pkg/grpcserver"
)

// start serves the test services on loopback; block, when given, serves
// test.Block.
func start(t *testing.T, opts grpcserver.Options, block ...*blocker) (*grpcserver.Server, *grpc.ClientConn, context.CancelFunc, <-chan error) {
	t.Helper()
	opts.Logger = slog.New(slog.DiscardHandler)
	s := grpcserver.New(opts)
	s.GRPC.RegisterService(&panicDesc, struct{}{})
	for _, b := range block {
		s.GRPC.RegisterService(&blockDesc, b)
	}
	s.SetServing("test.Panic")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); conn.Close() })
	return s, conn, cancel, done
}

// A stream that is still open at shutdown first sees NOT_SERVING, and the
// server stops within StopTimeout even though the stream never ends.
func TestShutdownOrder(t *testing.T) {
	_, conn, cancel, done := start(t, grpcserver.Options{StopTimeout: 300 * time.Millisecond})
	ctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ccancel()
	hc := healthpb.NewHealthClient(conn)
	resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "test.Panic"})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("check before shutdown: %v %v", resp, err)
	}
	w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: "test.Panic"})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := w.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("first watch message: %v %v", m, err)
	}
	cancel()
	m, err := w.Recv()
	if err != nil {
		t.Fatalf("watch ended before NOT_SERVING was sent: %v", err)
	}
	if m.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("status after shutdown began = %v, want NOT_SERVING", m.Status)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve returned %v, want nil after context shutdown", err)
		}
	case <-ctx.Done():
		t.Fatal("Serve did not return after StopTimeout")
	}
}

// A handler cut at StopTimeout cleans up before Serve returns, so the
// process does not exit under it; one whose cleanup hangs is given up on
// after CleanupTimeout.
func TestCutHandlersCleanUpBeforeServeReturns(t *testing.T) {
	for _, hang := range []bool{false, true} {
		var cleaned atomic.Bool
		stuck := make(chan struct{})
		t.Cleanup(func() { close(stuck) })
		blocked := &blocker{release: make(chan struct{}), cleanup: func() {
			if hang {
				<-stuck
			}
			time.Sleep(200 * time.Millisecond) // the cleanup's own work
			cleaned.Store(true)
		}}
		_, conn, cancel, done := start(t, grpcserver.Options{StopTimeout: 100 * time.Millisecond, CleanupTimeout: time.Second}, blocked)
		ctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer ccancel()
		go func() { _ = conn.Invoke(ctx, "/test.Block/Wait", &emptypb.Empty{}, &emptypb.Empty{}) }()
		for blocked.entered.Load() < 1 {
			select {
			case <-ctx.Done():
				t.Fatal("the call never reached its handler")
			case <-time.After(time.Millisecond):
			}
		}
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Serve returned %v", err)
			}
		case <-ctx.Done():
			t.Fatalf("Serve did not return (cleanup hangs: %v)", hang)
		}
		if cleaned.Load() == hang {
			t.Fatalf("cleanup hangs %v: cleaned up before Serve returned = %v", hang, cleaned.Load())
		}
	}
}

func TestPanicBecomesInternal(t *testing.T) {
	_, conn, _, _ := start(t, grpcserver.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := conn.Invoke(ctx, "/test.Panic/Boom", &emptypb.Empty{}, &emptypb.Empty{})
	if status.Code(err) != codes.Internal {
		t.Fatalf("code = %v, want Internal (err %v)", status.Code(err), err)
	}
	// The server survives the panic.
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("server unusable after panic: %v", err)
	}
}

// A client that compresses its messages with gzip is served. The codec
// registers itself for the whole process, so this test, which does not
// import it, fails unless the server package does.
func TestGzipClientsAreServed(t *testing.T) {
	if encoding.GetCompressor("gzip") == nil {
		t.Fatal("no gzip codec: clients compressing with gzip get UNIMPLEMENTED")
	}
	_, conn, _, _ := start(t, grpcserver.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.UseCompressor("gzip"))
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gzip call: %v, %v", resp, err)
	}
}

// Handlers run on a fixed set of reused goroutines while they last; more
// calls than that, all blocked, must still all run at once rather than
// wait for a free worker.
func TestBlockedHandlersDoNotQueueOthers(t *testing.T) {
	blocked := &blocker{release: make(chan struct{})}
	_, conn, _, _ := start(t, grpcserver.Options{}, blocked)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const calls = 300 // several times the server's stream workers
	errs := make(chan error, calls)
	for range calls {
		go func() { errs <- conn.Invoke(ctx, "/test.Block/Wait", &emptypb.Empty{}, &emptypb.Empty{}) }()
	}
	for blocked.entered.Load() < calls {
		select {
		case <-ctx.Done():
			t.Fatalf("only %d of %d blocked calls reached their handler", blocked.entered.Load(), calls)
		case <-time.After(time.Millisecond):
		}
	}
	close(blocked.release)
	for range calls {
		if err := <-errs; err != nil {
			t.Fatalf("call: %v", err)
		}
	}
}

// countingListener counts the connections it accepted.
type countingListener struct {
	net.Listener
	accepted atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

// A call still running when its connection reaches MaxConnectionAge is not
// cut (without a grace bound): new calls move to a new connection, and the
// old call, say an upload of gigabytes, runs to its end.
func TestAgedConnectionKeepsItsLongCall(t *testing.T) {
	blocked := &blocker{release: make(chan struct{})}
	s := grpcserver.New(grpcserver.Options{Logger: slog.New(slog.DiscardHandler), MaxConnectionAge: 200 * time.Millisecond, StopTimeout: 200 * time.Millisecond})
	s.GRPC.RegisterService(&blockDesc, blocked)
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis := &countingListener{Listener: inner}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { _ = s.Serve(sctx, lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	done := make(chan error, 1)
	go func() { done <- conn.Invoke(ctx, "/test.Block/Wait", &emptypb.Empty{}, &emptypb.Empty{}) }()
	// Short calls until one has gone over a second connection: the first
	// has reached its age.
	hc := healthpb.NewHealthClient(conn)
	for lis.accepted.Load() < 2 {
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil && ctx.Err() != nil {
			t.Fatalf("no second connection: %v", err)
		}
		if blocked.entered.Load() == 0 {
			continue
		}
		select {
		case err := <-done:
			t.Fatalf("the long call ended before its connection aged: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	// Nothing to poll for: the call must still be running well past the
	// age and what a grace of StopTimeout would have given it.
	select {
	case err := <-done:
		t.Fatalf("the long call was cut when its connection aged: %v", err)
	case <-time.After(time.Second):
	}
	close(blocked.release)
	if err := <-done; err != nil {
		t.Fatalf("the long call: %v", err)
	}
}

var panicDesc = grpc.ServiceDesc{
	ServiceName: "test.Panic",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Boom",
		Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, req any) (any, error) { panic("boom") }
			return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/test.Panic/Boom"}, h)
		},
	}},
}

// blocker serves test.Block/Wait: each call counts itself in and waits
// for release. A call cut by shutdown runs cleanup, when set, before it
// returns.
type blocker struct {
	entered atomic.Int32
	release chan struct{}
	cleanup func()
}

var blockDesc = grpc.ServiceDesc{
	ServiceName: "test.Block",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Wait",
		Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			if err := dec(&emptypb.Empty{}); err != nil {
				return nil, err
			}
			blocked := srv.(*blocker)
			blocked.entered.Add(1)
			select {
			case <-blocked.release:
			case <-ctx.Done():
				if blocked.cleanup != nil {
					blocked.cleanup()
				}
			}
			return &emptypb.Empty{}, nil
		},
	}},
}
