package telemetry_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

const (
	pingMethod = "/bucketlb.test.v1.Echo/Ping"
	failMethod = "/bucketlb.test.v1.Echo/Fail"
)

// serveEcho starts a real gRPC server on 127.0.0.1:0 with the Telemetry's
// server options, grpc.health.v1, and an Echo service answering
// pingMethod with OK and failMethod with PERMISSION_DENIED. It returns a
// client connection made with the Telemetry's dial options.
func serveEcho(t *testing.T, tel *telemetry.Telemetry) *grpc.ClientConn {
	t.Helper()
	opts := append(tel.ServerOptions(), grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(ss)
		// Tell the caller which trace the handler runs in.
		sc := trace.SpanContextFromContext(ss.Context())
		if err := ss.SetHeader(metadata.Pairs("x-trace-id", sc.TraceID().String())); err != nil {
			return err
		}
		if err := ss.RecvMsg(&emptypb.Empty{}); err != nil {
			return err
		}
		if method == failMethod {
			return status.Error(codes.PermissionDenied, "the test says no")
		}
		return ss.SendMsg(&emptypb.Empty{})
	}))
	srv := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(),
		append(tel.DialOptions(), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = conn.Close()
		srv.Stop()
		wg.Wait()
	})
	return conn
}

func invoke(t *testing.T, conn *grpc.ClientConn, method string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return conn.Invoke(ctx, method, &emptypb.Empty{}, &emptypb.Empty{})
}

// TestGRPCCallDurationScraped makes real gRPC calls over loopback through
// the stats handlers and checks what otelgrpc v0.72 really emits:
// rpc_server_call_duration_seconds (and the client twin) labelled with
// the fully qualified rpc_method and rpc_response_status_code, and no
// series for health checks.
func TestGRPCCallDurationScraped(t *testing.T) {
	t.Parallel()
	tel, base := start(t, telemetry.Options{})
	conn := serveEcho(t, tel)
	for range 3 {
		if err := invoke(t, conn, pingMethod); err != nil {
			t.Fatalf("Ping: %v", err)
		}
	}
	if err := invoke(t, conn, failMethod); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Fail: %v, want PermissionDenied", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health check: %v", err)
	}

	fams := scrape(t, base)
	for _, tc := range []struct {
		family, method, code string
		count                uint64
	}{
		{"rpc_server_call_duration_seconds", "bucketlb.test.v1.Echo/Ping", "OK", 3},
		{"rpc_server_call_duration_seconds", "bucketlb.test.v1.Echo/Fail", "PERMISSION_DENIED", 1},
		{"rpc_client_call_duration_seconds", "bucketlb.test.v1.Echo/Ping", "OK", 3},
		{"rpc_client_call_duration_seconds", "bucketlb.test.v1.Echo/Fail", "PERMISSION_DENIED", 1},
	} {
		m, err := find(fams, tc.family, map[string]string{
			"rpc_method": tc.method, "rpc_response_status_code": tc.code, "rpc_system_name": "grpc",
		})
		if err != nil {
			t.Error(err)
			continue
		}
		h := m.GetHistogram()
		if h == nil {
			t.Errorf("%s is not a histogram", tc.family)
			continue
		}
		if h.GetSampleCount() != tc.count {
			t.Errorf("%s{rpc_method=%q} count = %d, want %d", tc.family, tc.method, h.GetSampleCount(), tc.count)
		}
		if h.GetSampleSum() <= 0 || h.GetSampleSum() > 5 {
			t.Errorf("%s{rpc_method=%q} sum = %vs, want a positive duration in seconds", tc.family, tc.method, h.GetSampleSum())
		}
		if n := len(h.GetBucket()); n < 10 {
			t.Errorf("%s has %d buckets, want otelgrpc's explicit boundaries", tc.family, n)
		}
	}
	for _, family := range []string{"rpc_server_call_duration_seconds", "rpc_client_call_duration_seconds"} {
		if _, err := find(fams, family, map[string]string{"rpc_method": "grpc.health.v1.Health/Check"}); err == nil {
			t.Errorf("%s records health checks; the filter should leave them out", family)
		}
	}
}

// traceSink is a real OTLP/gRPC trace receiver on loopback.
type traceSink struct {
	coltracepb.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []*tracepb.ResourceSpans
}

func (s *traceSink) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.spans = append(s.spans, req.GetResourceSpans()...)
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func (s *traceSink) received() []*tracepb.ResourceSpans {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*tracepb.ResourceSpans(nil), s.spans...)
}

// TestTracesExportedOverOTLP: with OTLPEndpoint set, a call through the
// client and server stats handlers yields a client and a server span in
// one trace (context propagated in metadata), exported over OTLP/gRPC on
// Shutdown with the service's resource.
func TestTracesExportedOverOTLP(t *testing.T) {
	t.Parallel()
	sink := &traceSink{}
	collector := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(collector, sink)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = collector.Serve(lis) }()
	t.Cleanup(func() { collector.Stop(); wg.Wait() })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tel, err := telemetry.New(ctx, telemetry.Options{ServiceName: "bucketlb-allocator", Version: "v9", OTLPEndpoint: lis.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	conn := serveEcho(t, tel)
	if err := invoke(t, conn, pingMethod); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	if err := tel.Shutdown(ctx); err != nil { // flushes the batch
		t.Fatalf("Shutdown: %v", err)
	}

	type seen struct {
		kind    tracepb.Span_SpanKind
		traceID string
		parent  string
		id      string
	}
	var spans []seen
	for _, rs := range sink.received() {
		attrs := map[string]string{}
		for _, kv := range rs.GetResource().GetAttributes() {
			attrs[kv.GetKey()] = kv.GetValue().GetStringValue()
		}
		if attrs["service.name"] != "bucketlb-allocator" || attrs["service.version"] != "v9" {
			t.Errorf("resource attributes %v, want service.name bucketlb-allocator, service.version v9", attrs)
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, sp := range ss.GetSpans() {
				if sp.GetName() != "bucketlb.test.v1.Echo/Ping" {
					t.Errorf("unexpected span %q", sp.GetName())
					continue
				}
				spans = append(spans, seen{sp.GetKind(), string(sp.GetTraceId()), string(sp.GetParentSpanId()), string(sp.GetSpanId())})
			}
		}
	}
	if len(spans) != 2 {
		t.Fatalf("got %d Ping spans, want a client and a server span", len(spans))
	}
	client, server := spans[0], spans[1]
	if client.kind == tracepb.Span_SPAN_KIND_SERVER {
		client, server = server, client
	}
	if client.kind != tracepb.Span_SPAN_KIND_CLIENT || server.kind != tracepb.Span_SPAN_KIND_SERVER {
		t.Fatalf("span kinds %v and %v, want CLIENT and SERVER", client.kind, server.kind)
	}
	if server.traceID != client.traceID || server.parent != client.id {
		t.Error("the server span is not the client span's child: trace context did not propagate")
	}
}

// TestNoEndpointNoSpans: without OTLPEndpoint nothing is recorded, yet
// the caller's trace context still reaches the handler (logs can carry
// the trace id a traced client started).
func TestNoEndpointNoSpans(t *testing.T) {
	t.Parallel()
	tel, _ := start(t, telemetry.Options{})
	_, span := tel.TracerProvider().Tracer("test").Start(context.Background(), "x")
	defer span.End()
	if span.IsRecording() {
		t.Fatal("a span records although no OTLP endpoint is set")
	}

	conn := serveEcho(t, tel)
	traceID := trace.TraceID{0x4b, 0x75, 0x63, 0x6b, 0x65, 0x74, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	parent := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: traceID, SpanID: trace.SpanID{1, 2, 3, 4, 5, 6, 7, 8}, TraceFlags: trace.FlagsSampled, Remote: true,
	})
	ctx, cancel := context.WithTimeout(trace.ContextWithSpanContext(context.Background(), parent), 5*time.Second)
	defer cancel()
	var md metadata.MD
	if err := conn.Invoke(ctx, pingMethod, &emptypb.Empty{}, &emptypb.Empty{}, grpc.Header(&md)); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	if got := md.Get("x-trace-id"); len(got) != 1 || got[0] != traceID.String() {
		t.Fatalf("handler saw trace id %v, want %s", got, traceID)
	}
}
