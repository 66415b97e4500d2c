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

// A connection TLS turned away is not retried; a handshake cut off is a
// passing fault and is. The messages are grpc-go's, as seen here.
func TestHandshakeRefusalsAreNotRetried(t *testing.T) {
	for msg, retry := range map[string]bool{
		`connection error: desc = "transport: authentication handshake failed: tls: failed to verify certificate: x509: certificate signed by unknown authority"`: false,
		`connection error: desc = "error reading server preface: remote error: tls: certificate required"`:                                                        false,
		`connection error: desc = "transport: authentication handshake failed: tls: first record does not look like a TLS handshake"`:                             false,
		`connection error: desc = "transport: authentication handshake failed: EOF"`:                                                                              true,
		`connection error: desc = "transport: authentication handshake failed: read tcp 127.0.0.1:1->127.0.0.1:2: read: connection reset by peer"`:                true,
		`connection error: desc = "transport: authentication handshake failed: context deadline exceeded"`:                                                        true,
	} {
		if _, ok := retryAfter(status.Error(codes.Unavailable, msg), 1); ok != retry {
			t.Errorf("%s: retried %v, want %v", msg, ok, retry)
		}
	}
}
