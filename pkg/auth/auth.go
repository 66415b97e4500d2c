package auth

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/bucketlb/bucketlb/pkg/errinfo"
)

// LoadToken returns the token from the environment variable envName, or
// else from file, trimmed of surrounding white space; fileSetting names
// where file is configured, for errors ("allocator.adminTokenFile").
// Neither set is an error: a guarded API must not run open. Errors never
// contain the token.
func LoadToken(envName, fileSetting, file string) (string, error) {
	if v := strings.TrimSpace(os.Getenv(envName)); v != "" {
		return v, nil
	}
	if file == "" {
		return "", fmt.Errorf("auth: no token: set %s to it, or %s to a file holding it", envName, fileSetting)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("auth: read %s: %w", fileSetting, err)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return "", fmt.Errorf("auth: %s names %s, which is empty", fileSetting, file)
	}
	return tok, nil
}

// Bearer checks "authorization: Bearer <token>" on methods whose full name
// starts with a prefix (e.g. "/bucketlb.admin.v1.AdminService/").
type Bearer struct {
	name   string // what the token is for, in refusals: "admin"
	prefix string
	sums   [][32]byte // of the tokens taken
}

// NewBearer guards methods under prefix with tokens, a white-space
// separated list of which any is taken: during a rotation the list holds
// the new token and the old one (see First). name says what the token is
// for in refusals. No token makes every guarded call fail.
func NewBearer(name, prefix, tokens string) *Bearer {
	b := &Bearer{name: name, prefix: prefix}
	for _, t := range strings.Fields(tokens) {
		b.sums = append(b.sums, sha256.Sum256([]byte(t)))
	}
	return b
}

// First is the token a client sends from a list that NewBearer takes:
// its first. Rotating a token is then three rollouts of one Secret,
// "old new" to the servers, "new old" to the clients, "new" to all.
func First(tokens string) string {
	if f := strings.Fields(tokens); len(f) > 0 {
		return f[0]
	}
	return ""
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
		return errinfo.MarkNotApplied(ctx, status.Newf(codes.Unauthenticated, "this %s call needs an \"authorization: Bearer <token>\" header", b.name)).Err()
	}
	scheme, tok, ok := strings.Cut(strings.TrimSpace(vals[0]), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
		return errinfo.MarkNotApplied(ctx, status.New(codes.Unauthenticated, "the authorization header must have the form \"Bearer <token>\"")).Err()
	}
	// Hashing first makes the comparison constant-time in the length too;
	// every token is compared, so the time does not tell which matched.
	got := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	match := 0
	for _, sum := range b.sums {
		match |= subtle.ConstantTimeCompare(got[:], sum[:])
	}
	if match != 1 {
		return errinfo.MarkNotApplied(ctx, status.Newf(codes.PermissionDenied, "the %s token is not valid; check the token this server was configured with", b.name)).Err()
	}
	return nil
}

// Guards are the Bearers of one server, each for its own methods.
type Guards []*Bearer

// Check returns the first guard's refusal of the call, or nil.
func (g Guards) Check(ctx context.Context, method string) error {
	for _, b := range g {
		if err := b.Check(ctx, method); err != nil {
			return err
		}
	}
	return nil
}

// Unary is the unary server interceptor.
func (g Guards) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := g.Check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

// Stream is the stream server interceptor.
func (g Guards) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := g.Check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return h(srv, ss)
}

// Credentials sends First(tokens) as "authorization: Bearer <token>" on
// every call of a client connection. It does not ask for transport security:
// the services talk plain text inside the cluster, where the token keeps
// out callers that merely reach the port.
func Credentials(tokens string) credentials.PerRPCCredentials {
	return bearerCredentials(First(tokens))
}

type bearerCredentials string

func (c bearerCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(c)}, nil
}

func (bearerCredentials) RequireTransportSecurity() bool { return false }
