package auth

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// LoadToken returns the token from the environment variable envName, or
// else from file, trimmed of surrounding white space. Neither set is an
// error: the admin API must not run open. Errors never contain the token.
func LoadToken(envName, file string) (string, error) {
	if v := strings.TrimSpace(os.Getenv(envName)); v != "" {
		return v, nil
	}
	if file == "" {
		return "", fmt.Errorf("auth: no admin token: set %s or an admin token file", envName)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("auth: read admin token file: %w", err)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return "", errors.New("auth: admin token file is empty")
	}
	return tok, nil
}

// Bearer checks "authorization: Bearer <token>" on methods whose full name
// starts with a prefix (e.g. "/bucketlb.admin.v1.AdminService/").
type Bearer struct {
	prefix string
	sum    [32]byte
	open   bool // a token is configured
}

// NewBearer guards methods under prefix with token. An empty token makes
// every guarded call fail.
func NewBearer(prefix, token string) *Bearer {
	return &Bearer{prefix: prefix, sum: sha256.Sum256([]byte(token)), open: token != ""}
}

// Check returns nil when method is not guarded or ctx carries the token,
// and otherwise a gRPC status error (UNAUTHENTICATED or PERMISSION_DENIED).
func (b *Bearer) Check(ctx context.Context, method string) error {
	if !strings.HasPrefix(method, b.prefix) {
		return nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return status.Error(codes.Unauthenticated, "this admin call needs an \"authorization: Bearer <token>\" header")
	}
	scheme, tok, ok := strings.Cut(strings.TrimSpace(vals[0]), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
		return status.Error(codes.Unauthenticated, "the authorization header must have the form \"Bearer <token>\"")
	}
	// Hashing first makes the comparison constant-time in the length too.
	got := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	if subtle.ConstantTimeCompare(got[:], b.sum[:]) != 1 || !b.open {
		return status.Error(codes.PermissionDenied, "the admin token is not valid; check the token this server was configured with")
	}
	return nil
}

// Unary is the unary server interceptor.
func (b *Bearer) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := b.Check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

// Stream is the stream server interceptor.
func (b *Bearer) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := b.Check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return h(srv, ss)
}
