package uploader

import (
	"context"
	"errors"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/bucketlb/bucketlb/pkg/auth"
	"github.com/bucketlb/bucketlb/pkg/errinfo"
)

// AllocatorDialOptions are the options of the upload service's connection
// to the allocator: its service config (AllocatorServiceConfig), and the
// service token sent on every call.
func AllocatorDialOptions(serviceToken string) []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithDefaultServiceConfig(AllocatorServiceConfig),
		grpc.WithPerRPCCredentials(auth.Credentials(serviceToken)),
		grpc.WithChainUnaryInterceptor(tokenRefused, plainStatus),
	}
}

// plainStatus returns the status a failed call's error wraps, without the
// text gRPC's retries put in front of it ("max retries exhausted: failed
// after 3 attempts: rpc error: code = Unavailable desc = "): the
// allocator's own sentence is what a client is told.
func plainStatus(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	var st interface{ GRPCStatus() *status.Status }
	if err != nil && errors.As(err, &st) {
		return st.GRPCStatus().Err()
	}
	return err
}

// tokenRefused turns the allocator's refusal of the service token into
// UNAVAILABLE for the client: the refusal is about this service's
// configuration, not the client's credentials, and during a rotation of
// the token another upload replica may be set right.
func tokenRefused(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if c := status.Code(err); c == codes.Unauthenticated || c == codes.PermissionDenied {
		st := status.Newf(codes.Unavailable, "the allocator refused this upload service's service token (%s); an operator must give both services the same token",
			status.Convert(err).Message())
		if errinfo.Has(err, errinfo.NotApplied) {
			// The allocator marks a refusal that applied nothing, unless
			// gRPC retried the call after an attempt that may have.
			st = errinfo.With(st, errinfo.NotApplied)
		}
		return st.Err()
	}
	return err
}
