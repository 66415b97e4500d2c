package uploader

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Domain errors. All but errBucket are the client's fault.
var (
	errBadRequest  = errors.New("bad upload request")
	errUnsupported = errors.New("not supported")
	errNotFound    = errors.New("not found")
	errOutOfRange  = errors.New("out of range")
	errKeyReused   = errors.New("idempotency key reused")
	errBucket      = errors.New("bucket failed")
)

// badRequestError carries the sentence the client sees; it matches
// errBadRequest so callers can test for the class with errors.Is.
type badRequestError struct{ msg string }

func (e *badRequestError) Error() string        { return e.msg }
func (e *badRequestError) Is(target error) bool { return target == errBadRequest }

func badRequest(format string, a ...any) error {
	return &badRequestError{msg: fmt.Sprintf(format, a...)}
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
	switch {
	case errors.As(err, &bad):
		return status.Error(codes.InvalidArgument, bad.msg)
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
	case errors.Is(err, errIdle):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return err
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Internal, "upload service internal error: "+err.Error())
}
