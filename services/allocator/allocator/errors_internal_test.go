package allocator

import (
	"context"
	"fmt"
	"testing"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// etcd's ways of saying it cannot answer now (a leader change, a member
// stopping, raft stopping under the request) are UNAVAILABLE, which the
// upload service retries: not INTERNAL, after which it removed an object
// whose Commit may yet apply.
func TestEtcdTroubleIsUnavailable(t *testing.T) {
	for _, err := range []error{
		rpctypes.ErrLeaderChanged, rpctypes.ErrStopped, rpctypes.ErrNoLeader, rpctypes.ErrTimeout,
		rpctypes.ErrTimeoutDueToLeaderFail, rpctypes.ErrTimeoutDueToConnectionLost,
		status.Error(codes.Unknown, "raft: stopped"),
		rpctypes.ErrLeaseNotFound, // a write under a lease that ended: nothing applied
	} {
		wrapped := fmt.Errorf("ledger: write reservation: %w", err)
		if got := status.Code(toStatus(context.Background(), wrapped)); got != codes.Unavailable {
			t.Errorf("%v: %v, want Unavailable", wrapped, got)
		}
	}
	if got := status.Code(toStatus(context.Background(), fmt.Errorf("ledger: decode: %w", rpctypes.ErrEmptyKey))); got != codes.Internal {
		t.Errorf("a request etcd refuses as malformed: %v, want Internal (a bug here)", got)
	}
}
