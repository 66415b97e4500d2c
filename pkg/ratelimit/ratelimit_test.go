package ratelimit_test

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/bucketlb/bucketlb/pkg/errinfo"
	"github.com/bucketlb/bucketlb/pkg/ratelimit"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/tlsfiles"
)

type clock struct{ ns atomic.Int64 }

func (c *clock) now() time.Time { return time.Unix(0, c.ns.Load()) }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}

// echoService is a service of one unary and one server-streaming method
// that answer at once: what the limiter guards is only the calls' count.
var echoService = grpc.ServiceDesc{
	ServiceName: "test.Echo",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Call",
		Handler: func(_ any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			h := func(context.Context, any) (any, error) { return &emptypb.Empty{}, nil }
			if icpt == nil {
				return h(ctx, in)
			}
			return icpt(ctx, in, &grpc.UnaryServerInfo{FullMethod: "/test.Echo/Call"}, h)
		},
	}},
	Streams: []grpc.StreamDesc{{
		StreamName:    "Watch",
		ServerStreams: true,
		Handler: func(_ any, ss grpc.ServerStream) error {
			if err := ss.RecvMsg(new(emptypb.Empty)); err != nil {
				return err
			}
			return ss.SendMsg(&emptypb.Empty{})
		},
	}},
}

// serve runs a server with lim's interceptors, the echo service, health and
// reflection, and returns a connection to it.
func serve(t *testing.T, lim *ratelimit.Limiter) *grpc.ClientConn {
	t.Helper()
	addr := listen(t, lim)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// listen runs the server of serve with opts and returns its address.
func listen(t *testing.T, lim *ratelimit.Limiter, opts ...grpc.ServerOption) string {
	t.Helper()
	srv := grpc.NewServer(append(opts, grpc.UnaryInterceptor(lim.Unary), grpc.StreamInterceptor(lim.Stream))...)
	srv.RegisterService(&echoService, struct{}{})
	healthpb.RegisterHealthServer(srv, health.NewServer())
	reflection.Register(srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

func call(conn *grpc.ClientConn, client string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if client != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, ratelimit.ClientIDKey, client)
	}
	return conn.Invoke(ctx, "/test.Echo/Call", &emptypb.Empty{}, &emptypb.Empty{})
}

func watch(conn *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/test.Echo/Watch")
	if err != nil {
		return err
	}
	if err := s.SendMsg(&emptypb.Empty{}); err != nil {
		return err
	}
	if err := s.CloseSend(); err != nil {
		return err
	}
	return s.RecvMsg(new(emptypb.Empty))
}

// refusal checks that err is the limiter's refusal and returns its delay.
func refusal(t *testing.T, err error) time.Duration {
	t.Helper()
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("got %v, want ResourceExhausted", err)
	}
	var delay time.Duration
	reason := ""
	for _, d := range status.Convert(err).Details() {
		switch d := d.(type) {
		case *errdetails.RetryInfo:
			delay = d.GetRetryDelay().AsDuration()
		case *errdetails.ErrorInfo:
			reason = d.GetReason()
		}
	}
	if reason != errinfo.RateLimited {
		t.Fatalf("ErrorInfo reason %q, want %q", reason, errinfo.RateLimited)
	}
	return delay
}

func TestPerClientBucketsOverGRPC(t *testing.T) {
	clk := newClock()
	conn := serve(t, ratelimit.New(1, 3, clk.now)) // 1/s, burst 3
	for i := 0; i < 3; i++ {
		if err := call(conn, "a"); err != nil {
			t.Fatalf("call %d within burst: %v", i, err)
		}
	}
	if d := refusal(t, call(conn, "a")); d <= 0 || d > time.Second {
		t.Fatalf("retry delay %v, want (0, 1s]", d)
	}
	if err := call(conn, "b"); err != nil {
		t.Fatalf("another client is limited by a's usage: %v", err)
	}
	clk.ns.Add(int64(time.Second))
	if err := call(conn, "a"); err != nil {
		t.Fatalf("after 1s a token is back: %v", err)
	}
}

// Streams take one token each at the start (an upload is one stream), and
// the refusal carries RESOURCE_EXHAUSTED with RetryInfo; identity from the
// peer IP when no client id is sent.
func TestStreamInterceptorByPeerIP(t *testing.T) {
	clk := newClock()
	conn := serve(t, ratelimit.New(0.5, 1, clk.now)) // one stream, then one per 2s
	if err := watch(conn); err != nil {
		t.Fatalf("first stream: %v", err)
	}
	delay := refusal(t, watch(conn))
	if delay <= time.Second || delay > 2*time.Second {
		t.Fatalf("retry delay %v, want (1s, 2s]", delay)
	}
	clk.ns.Add(int64(delay))
	if err := watch(conn); err != nil {
		t.Fatalf("after the advertised delay: %v", err)
	}
}

// Health checks and reflection answer a client that used up its calls:
// kubelets, load balancers and operators share addresses (and so
// identities) with clients.
func TestHealthAndReflectionAreNotLimited(t *testing.T) {
	conn := serve(t, ratelimit.New(0.001, 1, newClock().now))
	if err := call(conn, ""); err != nil {
		t.Fatal(err)
	}
	refusal(t, call(conn, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i := 0; i < 3; i++ {
		if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatalf("health check %d: %v", i, err)
		}
		rs, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := rs.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
			t.Fatal(err)
		}
		if _, err := rs.Recv(); err != nil {
			t.Fatalf("reflection %d: %v", i, err)
		}
		_ = rs.CloseSend()
	}
}

// The limiter keeps at most MaxClients buckets however many identities
// call, and a client that keeps calling keeps its bucket (here an empty
// one: the clock stands still) through a flood of new identities.
func TestClientsAreBounded(t *testing.T) {
	lim := ratelimit.New(1, 1, newClock().now)
	if ok, _ := lim.Allow("a"); !ok {
		t.Fatal("first call refused")
	}
	for i := 0; i < ratelimit.MaxClients+5000; i++ {
		if ok, _ := lim.Allow(fmt.Sprintf("flood-%d", i)); !ok {
			t.Fatalf("new identity %d refused", i)
		}
		if i%1000 == 0 {
			if ok, _ := lim.Allow("a"); ok {
				t.Fatalf("after %d new identities, a got a token it never earned", i)
			}
		}
	}
	if n := lim.Clients(); n > ratelimit.MaxClients {
		t.Fatalf("%d buckets kept, want at most %d", n, ratelimit.MaxClients)
	}
	if ok, _ := lim.Allow("a"); ok {
		t.Fatal("a's empty bucket was dropped and refilled during the flood")
	}
}

func TestClientID(t *testing.T) {
	withPeer := func(addr string, cert *x509.Certificate) context.Context {
		p := &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(addr), Port: 40000}}
		if cert != nil {
			p.AuthInfo = credentials.TLSInfo{}
			ti := p.AuthInfo.(credentials.TLSInfo)
			ti.State.PeerCertificates = []*x509.Certificate{cert}
			p.AuthInfo = ti
		}
		return peer.NewContext(context.Background(), p)
	}
	spiffe, _ := url.Parse("spiffe://cluster.local/ns/apps/sa/thumbs")
	for _, c := range []struct {
		name string
		ctx  context.Context
		want string
	}{
		{"IPv4 without its port", withPeer("10.1.2.3", nil), "ip:10.1.2.3"},
		{"IPv4-mapped IPv6 as IPv4", withPeer("::ffff:10.1.2.3", nil), "ip:10.1.2.3"},
		{"IPv6 by its /64", withPeer("2001:db8:1:2:dead:beef:0:2", nil), "ip:2001:db8:1:2::/64"},
		{"another address of that /64", withPeer("2001:db8:1:2::1", nil), "ip:2001:db8:1:2::/64"},
		{"another /64", withPeer("2001:db8:1:3::1", nil), "ip:2001:db8:1:3::/64"},
		{"metadata over the address", metadata.NewIncomingContext(withPeer("10.1.2.3", nil), metadata.Pairs(ratelimit.ClientIDKey, "thumbs")), "id:thumbs"},
		{"certificate's URI name", withPeer("10.1.2.3", &x509.Certificate{URIs: []*url.URL{spiffe}, DNSNames: []string{"thumbs.apps"}}), "cert:spiffe://cluster.local/ns/apps/sa/thumbs"},
		{"certificate's DNS name", withPeer("10.1.2.3", &x509.Certificate{DNSNames: []string{"thumbs.apps"}}), "cert:thumbs.apps"},
		{"certificate's subject", withPeer("10.1.2.3", &x509.Certificate{Subject: pkix.Name{CommonName: "thumbs"}}), "cert:CN=thumbs"},
	} {
		if got := ratelimit.ClientID(c.ctx); got != c.want {
			t.Errorf("%s: ClientID = %q, want %q", c.name, got, c.want)
		}
	}
}

// Over mutual TLS a client is its certificate: two clients on one address
// have a bucket each, named by their URI names, whatever x-client-id
// they send.
func TestMutualTLSClientsHaveTheirOwnBuckets(t *testing.T) {
	pki := testenv.NewPKI(t)
	addr := listen(t, ratelimit.New(0.001, 1, newClock().now), grpc.Creds(credentials.NewTLS(pki.MutualTLS(t, "server"))))
	dialAs := func(name string) *grpc.ClientConn {
		cc, ck := pki.Issue(t, name, nil, "spiffe://test/"+name)
		cliTLS, err := tlsfiles.Client(pki.CAFile, cc, ck)
		if err != nil {
			t.Fatal(err)
		}
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cliTLS)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		return conn
	}
	a, b := dialAs("a"), dialAs("b")
	if err := call(a, "shared"); err != nil {
		t.Fatal(err)
	}
	refusal(t, call(a, "other"))
	if err := call(b, "shared"); err != nil {
		t.Fatalf("client b, limited by a's calls: %v", err)
	}
}
