package ratelimit_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/bucketlb/bucketlb/pkg/ratelimit"
)

type clock struct{ ns atomic.Int64 }

func (c *clock) now() time.Time { return time.Unix(0, c.ns.Load()) }

func TestPerClientBucketsOverGRPC(t *testing.T) {
	clk := &clock{}
	clk.ns.Store(time.Now().UnixNano())
	lim := ratelimit.New(1, 3, clk.now) // 1/s, burst 3
	srv := grpc.NewServer(grpc.UnaryInterceptor(lim.Unary))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	call := func(client string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ctx = metadata.AppendToOutgoingContext(ctx, ratelimit.ClientIDKey, client)
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}
	for i := 0; i < 3; i++ {
		if err := call("a"); err != nil {
			t.Fatalf("call %d within burst: %v", i, err)
		}
	}
	err = call("a")
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("4th call: %v, want ResourceExhausted", err)
	}
	var retry *errdetails.RetryInfo
	for _, d := range status.Convert(err).Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			retry = r
		}
	}
	if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 || retry.GetRetryDelay().AsDuration() > time.Second {
		t.Fatalf("RetryInfo = %v, want a delay in (0, 1s]", retry)
	}
	if err := call("b"); err != nil {
		t.Fatalf("another client is limited by a's usage: %v", err)
	}
	clk.ns.Add(int64(time.Second))
	if err := call("a"); err != nil {
		t.Fatalf("after 1s a token is back: %v", err)
	}
}

// Streams take one token each at the start (an upload is one stream), and
// the refusal carries RESOURCE_EXHAUSTED with RetryInfo; identity from the
// peer IP when no client id is sent.
func TestStreamInterceptorByPeerIP(t *testing.T) {
	clk := &clock{}
	clk.ns.Store(time.Now().UnixNano())
	lim := ratelimit.New(0.5, 1, clk.now) // one stream, then one per 2s
	srv := grpc.NewServer(grpc.StreamInterceptor(lim.Stream))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	watch := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			return err
		}
		_, err = s.Recv()
		return err
	}
	if err := watch(); err != nil {
		t.Fatalf("first stream: %v", err)
	}
	err = watch()
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("second stream: %v, want ResourceExhausted", err)
	}
	var delay time.Duration
	for _, d := range status.Convert(err).Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			delay = r.GetRetryDelay().AsDuration()
		}
	}
	if delay <= time.Second || delay > 2*time.Second {
		t.Fatalf("retry delay %v, want (1s, 2s]", delay)
	}
	clk.ns.Add(int64(delay))
	if err := watch(); err != nil {
		t.Fatalf("after the advertised delay: %v", err)
	}
}
