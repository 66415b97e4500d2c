package uploadclient

import (
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Whatever delay a server (or something between) puts in RetryInfo, the
// wait is the delay, within [0, maxRetryWait], plus at most half again:
// never a panic, never negative, never unbounded.
func TestRetryAfterAnyDelay(t *testing.T) {
	for _, delay := range []time.Duration{-5 * time.Second, -1, 0, 1, time.Second, time.Hour} {
		st, err := status.New(codes.Unavailable, "busy").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(delay)})
		if err != nil {
			t.Fatal(err)
		}
		wait, ok := retryAfter(st.Err(), 1)
		base := max(0, min(delay, maxRetryWait))
		if !ok || wait < base || wait > base+base/2 {
			t.Fatalf("delay %v: wait %v (retry %v), want [%v, %v]", delay, wait, ok, base, base+base/2)
		}
	}
}
