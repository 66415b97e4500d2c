// Package auth guards gRPC methods with a static bearer token, compared in
// constant time. The token is never logged.
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
// else from file. Empty both is an error: the admin API must not run open.
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
// starts with Prefix (e.g. "/bucketlb.admin.v1.AdminService/").
type Bearer struct {
	prefix string
	sum    [32]byte
}

// NewBearer guards methods under prefix with token.
func NewBearer(prefix, token string) *Bearer {
	return &Bearer{prefix: prefix, sum: sha256.Sum256([]byte(token))}
}

func (b *Bearer) check(ctx context.Context, method string) error {
	if !strings.HasPrefix(method, b.prefix) {
		return nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return status.Error(codes.Unauthenticated, "this admin call needs an \"authorization: Bearer <token>\" header")
	}
	tok, ok := strings.CutPrefix(vals[0], "Bearer ")
	if !ok {
		return status.Error(codes.Unauthenticated, "the authorization header must have the form \"Bearer <token>\"")
	}
	// Hashing first makes the comparison constant-time in the length too.
	got := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	if subtle.ConstantTimeCompare(got[:], b.sum[:]) != 1 {
		return status.Error(codes.PermissionDenied, "the admin token is not valid")
	}
	return nil
}

// Unary is the unary server interceptor.
func (b *Bearer) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := b.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

// Stream is the stream server interceptor.
func (b *Bearer) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := b.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return h(srv, ss)
}
