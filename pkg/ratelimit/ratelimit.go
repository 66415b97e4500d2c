// Package ratelimit applies per-client token buckets to gRPC calls. The
// client is identified by its mTLS certificate's subject, else by the
// "x-client-id" metadata set by a trusted caller, else by peer IP.
package ratelimit

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// ClientIDKey is the metadata key naming the client when there is no mTLS.
const ClientIDKey = "x-client-id"

// Limiter holds one token bucket per client. Idle buckets are dropped.
type Limiter struct {
	rate  rate.Limit
	burst int
	now   func() time.Time

	mu      sync.Mutex
	clients map[string]*entry
	calls   int
}

type entry struct {
	lim  *rate.Limiter
	seen time.Time
}

// New allows each client perSecond calls with bursts of burst. now may be
// nil (time.Now); tests inject a clock.
func New(perSecond float64, burst int, now func() time.Time) *Limiter {
	if now == nil {
		now = time.Now
	}
	return &Limiter{rate: rate.Limit(perSecond), burst: burst, now: now, clients: map[string]*entry{}}
}

// Allow takes a token for client, or says how long to wait for one.
func (l *Limiter) Allow(client string) (bool, time.Duration) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.clients[client]
	if !ok {
		e = &entry{lim: rate.NewLimiter(l.rate, l.burst)}
		l.clients[client] = e
	}
	e.seen = now
	l.calls++
	if l.calls%1024 == 0 {
		for id, c := range l.clients {
			if now.Sub(c.seen) > 10*time.Minute {
				delete(l.clients, id)
			}
		}
	}
	r := e.lim.ReserveN(now, 1)
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
			return "cert:" + ti.State.PeerCertificates[0].Subject.String()
		}
	}
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(ClientIDKey); len(v) > 0 && v[0] != "" {
			return "id:" + v[0]
		}
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
			return "ip:" + host
		}
		return "ip:" + p.Addr.String()
	}
	return "unknown"
}

func (l *Limiter) check(ctx context.Context) error {
	id := ClientID(ctx)
	ok, wait := l.Allow(id)
	if ok {
		return nil
	}
	st := status.New(codes.ResourceExhausted, fmt.Sprintf("rate limit reached for this client; retry in %s", wait.Round(time.Millisecond)))
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(wait)}); err == nil {
		st = d
	}
	return st.Err()
}

// Unary is a unary server interceptor.
func (l *Limiter) Unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := l.check(ctx); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

// Stream is a stream server interceptor; one token per stream.
func (l *Limiter) Stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := l.check(ss.Context()); err != nil {
		return err
	}
	return h(srv, ss)
}
