package uploader

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// Domain errors. All but errBucket and errCorrupt are the client's fault.
var (
	errBadRequest  = errors.New("bad upload request")
	errUnsupported = errors.New("not supported")
	errNotFound    = errors.New("not found")
	errOutOfRange  = errors.New("out of range")
	errKeyReused   = errors.New("idempotency key reused")
	errBucket      = errors.New("bucket failed")
	errCorrupt     = errors.New("object bytes do not match their sha256")
)

// unavailableError is a failure neither the client's nor a bucket's (the
// allocator refused a Commit, a reservation lapsed mid-upload), worth a
// retry: UNAVAILABLE, in its own words.
type unavailableError struct{ msg string }

func (e *unavailableError) Error() string { return e.msg }

func unavailable(format string, a ...any) error {
	return &unavailableError{msg: fmt.Sprintf(format, a...)}
}

// bucketFault is a bucket's failure in two wordings: Error, for logs,
// holds the SDK's whole text (operation, endpoint URL, key, request ids);
// the client's status gets what the bucket did in a few words instead
// (objstore.Describe). It matches errBucket for errors.Is.
type bucketFault struct {
	before, after string
	cause         error
	// retry is the retry delay the client is given; 0 means a second.
	retry time.Duration
}

// bucketFailed words cause between before and after.
func bucketFailed(cause error, before, after string) error {
	return &bucketFault{before: before, after: after, cause: cause}
}

// noOtherBucket is an upload's failure when the buckets it tried (tried,
// the last failing with cause) failed and the allocator then had no other
// (refusal): in the allocator's words, with its retry delay when it gave
// one.
func noOtherBucket(cause error, tried []string, refusal error) error {
	n := fmt.Sprintf("%d buckets", len(tried))
	if len(tried) == 1 {
		n = "1 bucket"
	}
	st := status.Convert(refusal)
	f := &bucketFault{before: fmt.Sprintf("%s failed, the last (%s) with ", n, tried[len(tried)-1]),
		after: "; no other bucket is available: " + st.Message(), cause: cause}
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			f.retry = ri.GetRetryDelay().AsDuration()
		}
	}
	return f
}

// retryDelay is the retry delay the client is given.
func (e *bucketFault) retryDelay() time.Duration {
	if e.retry > 0 {
		return e.retry
	}
	return time.Second
}

func (e *bucketFault) Error() string        { return e.before + e.cause.Error() + e.after }
func (e *bucketFault) Unwrap() error        { return e.cause }
func (e *bucketFault) Is(target error) bool { return target == errBucket }

// bucketTrouble is a bucket's trouble in the service's own words, which
// the client reads as they are. It matches errBucket for errors.Is.
type bucketTrouble struct{ msg string }

func bucketTroublef(format string, a ...any) error {
	return &bucketTrouble{msg: fmt.Sprintf(format, a...)}
}

func (e *bucketTrouble) Error() string        { return e.msg }
func (e *bucketTrouble) Is(target error) bool { return target == errBucket }

// forClient is the sentence the client sees.
func (e *bucketFault) forClient() string {
	what := objstore.Describe(e.cause)
	var un *unavailableError
	if errors.Is(e.cause, errBucket) || errors.As(e.cause, &un) {
		what = e.cause.Error() // the service's own words already
	}
	return e.before + what + e.after
}

// badRequestError carries the sentence the client sees and, when one
// field of the request is at fault, its path ("header.key"), which goes
// out as a google.rpc.BadRequest field violation so a program can tell
// which field to fix. It matches errBadRequest for errors.Is.
type badRequestError struct{ field, msg string }

func (e *badRequestError) Error() string        { return e.msg }
func (e *badRequestError) Is(target error) bool { return target == errBadRequest }

// badRequest is a request wrong as a whole (the order of its messages).
func badRequest(format string, a ...any) error {
	return &badRequestError{msg: fmt.Sprintf(format, a...)}
}

// badField is a request with one wrong field.
func badField(field, format string, a ...any) error {
	return &badRequestError{field: field, msg: fmt.Sprintf(format, a...)}
}

func (e *badRequestError) status() error {
	st := status.New(codes.InvalidArgument, e.msg)
	if e.field == "" {
		return st.Err()
	}
	d, err := st.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: e.field, Description: e.msg}}})
	if err != nil {
		return st.Err()
	}
	return d.Err()
}

// toStatus is the one place where errors become gRPC statuses. Statuses
// from the allocator pass through unchanged: they already say what to do.
func toStatus(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return status.FromContextError(ctx.Err()).Err()
	}
	var bad *badRequestError
	var fault *bucketFault
	var un *unavailableError
	switch {
	case errors.As(err, &bad):
		return bad.status()
	case errors.As(err, &fault):
		// Buckets fail and recover (or cool down) by themselves: a retry
		// may be placed on one that works.
		return retryAfter(codes.Unavailable, fault.retryDelay(), fault.forClient())
	case errors.As(err, &un):
		return status.Error(codes.Unavailable, un.msg)
	case errors.Is(err, errUnsupported):
		return status.Error(codes.Unimplemented, err.Error())
	case errors.Is(err, errNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, errOutOfRange):
		return status.Error(codes.OutOfRange, err.Error())
	case errors.Is(err, errKeyReused):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, errBucket):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, errCorrupt):
		return status.Error(codes.DataLoss, err.Error())
	case errors.Is(err, errIdle):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return err
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	if r, ok := objstore.RefusalOf(err); ok {
		return refused(r)
	}
	return status.Error(codes.Internal, "upload service internal error: "+err.Error())
}

// refused words a bucket's refusal of what this request asked (a key or
// metadata it will not store, a key that clashes with what it holds): the
// request's fault, not the service's, said in the bucket's words.
func refused(r objstore.Refusal) error {
	code := codes.InvalidArgument
	if r.Status == http.StatusConflict || r.Status == http.StatusPreconditionFailed {
		code = codes.FailedPrecondition // the request clashes with what the bucket holds
	}
	why := r.Code
	switch {
	case r.Code == "":
		why = "no S3 error in its answer"
	case r.Message != "":
		why = fmt.Sprintf("%s (%s)", strings.TrimSuffix(r.Message, "."), r.Code)
	}
	return status.Errorf(code, "the bucket refused the request: %s, HTTP %d", why, r.Status)
}

// unreachable words a failed allocator call for the client. Every status
// the allocator itself sends says what happened (its UNAVAILABLE ones
// carry a retry delay) and passes through. A bare UNAVAILABLE is the gRPC
// client's own: the call got no answer even after its retries on other
// replicas, and its message ("connection error: ... dial tcp
// 10.0.3.7:7001: connect: connection refused") is about a connection
// inside the system, not the request: it is logged, not sent.
func (s *Server) unreachable(ctx context.Context, err error, consequence string) error {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable || len(st.Details()) > 0 {
		return err
	}
	s.log.WarnContext(ctx, "the allocator could not be reached", "error", st.Message())
	return retryLater(codes.Unavailable, fmt.Sprintf("the allocator could not be reached; %s; retry shortly", consequence))
}
