package allocator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bucketlb/bucketlb/pkg/errinfo"
	"github.com/bucketlb/bucketlb/pkg/ledger"
)

// Domain errors of this package.
var (
	errNoHealthyBucket = errors.New("no healthy bucket can take uploads right now")
	errNoRoom          = errors.New("no bucket has room for this many bytes this period")
	// errNoRoomThisPeriod: not even committed bytes leave room in any
	// active bucket, so no reservation ending can make it.
	errNoRoomThisPeriod = fmt.Errorf("%w: every active bucket's committed bytes leave less than that", errNoRoom)
	// errNoBucketInService: every bucket is DRAINING or DISABLED (or
	// there is none): only an operator can help.
	errNoBucketInService = errors.New("no bucket is in service to take uploads")
	errInvalid           = errors.New("invalid request")
	errNoRecord          = errors.New("no upload is recorded under this idempotency key")
	errDisabled          = errors.New("bucket is disabled")
)

// bucketChanged: the bucket an upload was granted was disabled or moved
// while it ran (see changedUnder); why is the sentence the caller gets.
type bucketChanged struct{ why string }

func (e *bucketChanged) Error() string { return e.why }

// toStatus is the ONE place where domain errors become gRPC statuses.
// ctx is the caller's: when it ended, its own code is returned.
func toStatus(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return status.FromContextError(ctx.Err()).Err()
	}
	var changed *bucketChanged
	switch {
	case errors.Is(err, ledger.ErrInvalid), errors.Is(err, errInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ledger.ErrBucketNotFound), errors.Is(err, errNoRecord):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, errNoBucketInService):
		// No RetryInfo: no bucket comes back into service by itself. No
		// room is what the caller meets: the capacity alert fires, and
		// the upload counts as failed, not as the caller's fault.
		return status.Error(codes.ResourceExhausted, err.Error()+"; an operator must set a bucket ACTIVE or add one")
	case errors.Is(err, errNoRoomThisPeriod):
		// No RetryInfo: retrying cannot help before an operator acts.
		return status.Error(codes.ResourceExhausted, err.Error()+"; add a bucket or raise a limit")
	case errors.Is(err, errNoRoom):
		// Live reservations hold the room; some end soon.
		return withRetry(codes.ResourceExhausted, err.Error()+"; add a bucket or raise a limit", time.Minute)
	case errors.Is(err, ledger.ErrClaimed):
		return withRetry(codes.Aborted, err.Error()+"; retry after that upload ends to get its result", time.Second)
	case errors.Is(err, ledger.ErrRecorded):
		return status.Error(codes.AlreadyExists, err.Error()+"; read it with GetUploadRecord")
	case errors.Is(err, errDisabled):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.As(err, &changed):
		return errinfo.With(status.New(codes.FailedPrecondition, changed.why), errinfo.BucketChanged).Err()
	case errors.Is(err, ledger.ErrReservationLost):
		return status.Error(codes.FailedPrecondition, err.Error()+"; abort the upload and remove its object")
	case errors.Is(err, errNoHealthyBucket):
		// Health is shared, so every replica would answer the same: the
		// caller's gRPC retry policy is told not to ask another one now.
		_ = grpc.SetTrailer(ctx, metadata.Pairs("grpc-retry-pushback-ms", "-1"))
		return withRetry(codes.Unavailable, err.Error(), 5*time.Second)
	case errors.Is(err, ledger.ErrOutcomeUnknown):
		// Not marked not-applied: an earlier try may yet apply.
		return withRetry(codes.Unavailable, err.Error(), time.Second)
	case errors.Is(err, ledger.ErrConflict):
		// Not marked not-applied: a commit whose replica lost its term
		// while the batch was in flight ends here too, outcome unknown.
		return withRetry(codes.Unavailable, err.Error(), 100*time.Millisecond)
	case ledger.LeaseLost(err):
		// Nothing applied; the replica takes a new lease for the next
		// try, and another replica may answer meanwhile.
		return notApplied(ctx, "an etcd lease the allocator's write carried had ended (the replica's own after a pause, or one its records hang on); retry", 100*time.Millisecond)
	case ledger.IsNoSpace(err):
		// etcd refuses writes until an operator acts; reads still
		// work. Not INTERNAL: nothing is wrong with the request or with
		// the allocator, and an upload may be retried once etcd has room.
		// Every replica shares etcd: the caller's gRPC retry policy is
		// told not to ask another now. Not marked NOT_APPLIED here: etcd
		// applies the write that crosses its quota and then answers
		// NOSPACE (Commit marks its own answer, once it has read what
		// stands).
		_ = grpc.SetTrailer(ctx, metadata.Pairs("grpc-retry-pushback-ms", "-1"))
		return withRetry(codes.Unavailable, "etcd is out of space (its NOSPACE alarm is raised) and takes no writes; an operator must defragment it and disarm the alarm", 30*time.Second)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled),
		etcdUnavailable(err), status.Code(err) == codes.Unavailable:
		// etcd did not answer in time: fail closed rather than guess.
		return withRetry(codes.Unavailable, "the allocator cannot reach etcd; retry shortly", time.Second)
	}
	return status.Error(codes.Internal, fmt.Sprintf("allocator internal error: %v", err))
}

func withRetry(c codes.Code, msg string, after time.Duration) error {
	return retryStatus(c, msg, after).Err()
}

func retryStatus(c codes.Code, msg string, after time.Duration) *status.Status {
	st, err := status.New(c, msg).WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(after)})
	if err != nil {
		return status.New(c, msg)
	}
	return st
}

// notApplied is UNAVAILABLE for a call etcd refused before it changed
// anything: marked so (unless gRPC retried the call, whose earlier attempt
// may have applied), a caller need not treat it as a lost answer: an
// upload whose Commit was refused removes its object.
func notApplied(ctx context.Context, msg string, after time.Duration) error {
	return errinfo.MarkNotApplied(ctx, retryStatus(codes.Unavailable, msg, after)).Err()
}

// etcdUnavailable reports etcd's own ways of saying it cannot answer now:
// no leader, a leader change or timeout, a member stopping (all codes
// Unavailable in etcd's errors), and raft stopping under a request, which
// reaches the client as an Unknown status with only its text.
func etcdUnavailable(err error) bool {
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) && (ee.Code() == codes.Unavailable || ee.Code() == codes.DeadlineExceeded) {
		return true
	}
	return strings.Contains(err.Error(), "raft: stopped")
}
