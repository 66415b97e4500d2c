// Package ratelimit applies per-client token buckets to gRPC calls. The
// client is identified by its mTLS certificate (URI or DNS name, else
// subject), else by the "x-client-id" metadata set by a trusted caller,
// else by peer IP (an IPv6 peer by its /64).
package ratelimit

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"golang.org/x/time/rate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bucketlb/bucketlb/pkg/errinfo"
)

// ClientIDKey is the metadata key naming the client when there is no mTLS.
const ClientIDKey = "x-client-id"

// MaxClients bounds the token buckets a Limiter keeps (about 200 bytes
// each). Past it the least recently seen client's bucket goes: identities
// are cheap to make up (a new x-client-id, a new IPv6 address), and
// memory and the time under the lock must not grow with them.
const MaxClients = 1 << 16

// Limiter holds one token bucket per client, for at most MaxClients
// clients.
type Limiter struct {
	rate  rate.Limit
	burst int
	now   func() time.Time

	mu      sync.Mutex
	clients *simplelru.LRU[string, *rate.Limiter]
}

// New allows each client perSecond calls with bursts of burst. now may be
// nil (time.Now); tests inject a clock.
func New(perSecond float64, burst int, now func() time.Time) *Limiter {
	if now == nil {
		now = time.Now
	}
	clients, err := simplelru.NewLRU[string, *rate.Limiter](MaxClients, nil)
	if err != nil {
		panic(err) // only for a size below 1
	}
	return &Limiter{rate: rate.Limit(perSecond), burst: burst, now: now, clients: clients}
}

// Clients is the number of clients with a bucket.
func (l *Limiter) Clients() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.clients.Len()
}

// Allow takes a token for client, or says how long to wait for one.
func (l *Limiter) Allow(client string) (bool, time.Duration) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	lim, ok := l.clients.Get(client)
	if !ok {
		lim = rate.NewLimiter(l.rate, l.burst)
		l.clients.Add(client, lim)
	}
	r := lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}

// ClientID names the caller of ctx.
func ClientID(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			return "cert:" + certName(ti.State.PeerCertificates[0])
		}
	}
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(ClientIDKey); len(v) > 0 && v[0] != "" {
			return "id:" + v[0]
		}
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return "ip:" + hostOf(p.Addr.String())
	}
	return "unknown"
}

// certName names a client certificate: its first URI SAN (a SPIFFE id),
// else its first DNS SAN, else its subject. Certificates from mesh and
// cert-manager issuers often carry an empty subject, which would put every
// such client in one bucket.
func certName(c *x509.Certificate) string {
	switch {
	case len(c.URIs) > 0:
		return c.URIs[0].String()
	case len(c.DNSNames) > 0:
		return c.DNSNames[0]
	}
	return c.Subject.String()
}

// hostOf is the client part of a peer address: the IPv4 address, or the
// /64 prefix of an IPv6 one, since a single host may use any address of
// its /64 and would otherwise count as that many clients.
func hostOf(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is4() {
		return ip.String()
	}
	return netip.PrefixFrom(ip, 64).Masked().String()
}

func (l *Limiter) check(ctx context.Context) error {
	id := ClientID(ctx)
	ok, wait := l.Allow(id)
	if ok {
		return nil
	}
	// The ErrorInfo lets a client tell this from a full bucket (also
	// RESOURCE_EXHAUSTED) and wait its turn instead of giving up.
	st := status.New(codes.ResourceExhausted, fmt.Sprintf("rate limit reached for this client; retry in %s", wait.Round(time.Millisecond)))
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(wait)}); err == nil {
		st = d
	}
	return errinfo.With(st, errinfo.RateLimited).Err()
}

// exempt reports whether a method is outside every client's limit: health
// checks and reflection, which kubelets, load balancers and operators
// call from the same addresses as clients, and which must answer whatever
// those clients used up.
func exempt(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.Health/") || strings.HasPrefix(method, "/grpc.reflection.")
}

// Unary is a unary server interceptor.
func (l *Limiter) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if exempt(info.FullMethod) {
		return h(ctx, req)
	}
	if err := l.check(ctx); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

// Stream is a stream server interceptor; one token per stream.
func (l *Limiter) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if exempt(info.FullMethod) {
		return h(srv, ss)
	}
	if err := l.check(ss.Context()); err != nil {
		return err
	}
	return h(srv, ss)
}
