package errinfo_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bucketlb/bucketlb/pkg/errinfo"
)

func TestReasons(t *testing.T) {
	st, err := status.New(codes.Unavailable, "etcd is out of space").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(1)})
	if err != nil {
		t.Fatal(err)
	}
	marked := errinfo.With(st, errinfo.NotApplied).Err()
	if !errinfo.Has(marked, errinfo.NotApplied) || errinfo.Has(marked, errinfo.RateLimited) {
		t.Fatalf("%v: want NotApplied only", status.Convert(marked).Details())
	}
	if len(status.Convert(marked).Details()) != 2 {
		t.Fatalf("details %v: the RetryInfo was lost", status.Convert(marked).Details())
	}
	other, _ := status.New(codes.Unavailable, "x").WithDetails(&errdetails.ErrorInfo{Reason: errinfo.NotApplied, Domain: "elsewhere"})
	for _, e := range []error{nil, errors.New("plain"), st.Err(), other.Err(), fmt.Errorf("wrapped: %w", errors.New("x"))} {
		if errinfo.Has(e, errinfo.NotApplied) {
			t.Fatalf("%v: has NotApplied", e)
		}
	}
}

// flaky answers UNAVAILABLE to its first call, and every call after it
// with a refusal marked (if it may be) NOT_APPLIED.
type flaky struct {
	healthpb.UnimplementedHealthServer
	calls atomic.Int32
}

func (f *flaky) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if f.calls.Add(1) == 1 {
		return nil, status.Error(codes.Unavailable, "answer lost; may have applied")
	}
	return nil, errinfo.MarkNotApplied(ctx, status.New(codes.Unavailable, "refused")).Err()
}

// A refusal is marked NOT_APPLIED only on a call's first attempt: when
// gRPC's retry policy tried the call again after an UNAVAILABLE (whose
// attempt may have applied), the final refusal must not say nothing
// applied. Real gRPC on loopback, with the retry policy the upload
// service uses.
func TestNotAppliedOnlyOnTheFirstAttempt(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	f := &flaky{}
	healthpb.RegisterHealthServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	const retrying = `{"methodConfig": [{"name": [{"service": "grpc.health.v1.Health"}], "retryPolicy": {
		"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.01s", "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}]}`
	for _, tc := range []struct {
		name          string
		serviceConfig string
		want          bool
	}{
		{"retried after a lost answer", retrying, false},
		{"not retried", `{}`, true},
	} {
		f.calls.Store(0)
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultServiceConfig(tc.serviceConfig))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c := healthpb.NewHealthClient(conn)
		if tc.serviceConfig == `{}` {
			_, _ = c.Check(ctx, &healthpb.HealthCheckRequest{}) // the lost answer, seen by the caller
		}
		_, err = c.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		conn.Close()
		if got := errinfo.Has(err, errinfo.NotApplied); got != tc.want || f.calls.Load() < 2 {
			t.Fatalf("%s: %v after %d attempts: NOT_APPLIED %v, want %v", tc.name, err, f.calls.Load(), got, tc.want)
		}
	}
}
