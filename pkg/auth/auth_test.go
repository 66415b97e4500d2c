package auth_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/auth"
)

const token = "s3cr3t-t0ken-value"

type adminStub struct {
	adminv1.UnimplementedAdminServiceServer
}

func (adminStub) ListBuckets(context.Context, *adminv1.ListBucketsRequest) (*adminv1.ListBucketsResponse, error) {
	return &adminv1.ListBucketsResponse{}, nil
}

// serve starts a real gRPC server on loopback with the admin stub and grpc
// health, guarded by b, and returns a client connection.
func serve(t *testing.T, b ...*auth.Bearer) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := auth.Guards(b)
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(g.Unary), grpc.ChainStreamInterceptor(g.Stream))
	adminv1.RegisterAdminServiceServer(srv, adminStub{})
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func withAuth(ctx context.Context, v string) context.Context {
	if v == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", v)
}

func TestUnaryAdminCalls(t *testing.T) {
	conn := serve(t, auth.NewBearer("admin", "/"+adminv1.AdminService_ServiceDesc.ServiceName+"/", token))
	admin := adminv1.NewAdminServiceClient(conn)
	cases := []struct {
		name   string
		header string
		want   codes.Code
	}{
		{"no header", "", codes.Unauthenticated},
		{"not bearer", "Basic " + token, codes.Unauthenticated},
		{"bearer without token", "Bearer ", codes.Unauthenticated},
		{"bare token", token, codes.Unauthenticated},
		{"wrong token", "Bearer nope", codes.PermissionDenied},
		{"prefix of token", "Bearer " + token[:len(token)-1], codes.PermissionDenied},
		{"token with suffix", "Bearer " + token + "x", codes.PermissionDenied},
		{"right token", "Bearer " + token, codes.OK},
		{"scheme is case-insensitive", "bearer " + token, codes.OK},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := admin.ListBuckets(withAuth(ctx, tc.header), &adminv1.ListBucketsRequest{})
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code %v, want %v (%v)", got, tc.want, err)
			}
			if err != nil {
				msg := status.Convert(err).Message()
				if strings.Contains(msg, token) || strings.Contains(msg, "nope") {
					t.Fatalf("error message reveals a token: %q", msg)
				}
				if len(msg) < 20 {
					t.Fatalf("error message %q is not a sentence", msg)
				}
			}
			// Auth passed: the stub's unimplemented method says so, not auth.
			if tc.want == codes.OK {
				_, err := admin.GetStatus(withAuth(ctx, tc.header), &adminv1.GetStatusRequest{})
				if status.Code(err) != codes.Unimplemented {
					t.Fatalf("GetStatus with the token: %v, want Unimplemented from the stub", err)
				}
			}
		})
	}
}

// Methods outside the prefix (health, here) need no token.
func TestUnguardedMethodsPass(t *testing.T) {
	conn := serve(t, auth.NewBearer("admin", "/"+adminv1.AdminService_ServiceDesc.ServiceName+"/", token))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health check without a token: %v", err)
	}
}

// The stream interceptor guards streaming methods (health Watch here).
func TestStreamCalls(t *testing.T) {
	conn := serve(t, auth.NewBearer("health", "/grpc.health.v1.Health/", token))
	hc := healthpb.NewHealthClient(conn)
	for _, tc := range []struct {
		header string
		want   codes.Code
	}{{"", codes.Unauthenticated}, {"Bearer wrong", codes.PermissionDenied}, {"Bearer " + token, codes.OK}} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := hc.Watch(withAuth(ctx, tc.header), &healthpb.HealthCheckRequest{})
		if err == nil {
			_, err = st.Recv()
		}
		cancel()
		if got := status.Code(err); got != tc.want {
			t.Fatalf("Watch with %q: code %v, want %v (%v)", tc.header, got, tc.want, err)
		}
	}
}

// A Bearer with no configured token fails closed, even for "Bearer x".
func TestEmptyTokenFailsClosed(t *testing.T) {
	b := auth.NewBearer("svc", "/svc/", "")
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer x"))
	if got := status.Code(b.Check(ctx, "/svc/M")); got != codes.PermissionDenied {
		t.Fatalf("code %v, want PermissionDenied", got)
	}
	ctx = metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "))
	if got := status.Code(b.Check(ctx, "/svc/M")); got != codes.Unauthenticated {
		t.Fatalf("code %v, want Unauthenticated", got)
	}
}

func TestLoadToken(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "token")
	if err := os.WriteFile(good, []byte("  from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, env, file, want string
		wantErr               bool
	}{
		{"env wins over file", "from-env", good, "from-env", false},
		{"file trimmed", "", good, "from-file", false},
		{"blank env falls back to file", "  ", good, "from-file", false},
		{"nothing configured", "", "", "", true},
		{"missing file", "", filepath.Join(dir, "absent"), "", true},
		{"empty file", "", empty, "", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("BUCKETLB_TEST_TOKEN", tc.env)
			got, err := auth.LoadToken("BUCKETLB_TEST_TOKEN", "test.tokenFile", tc.file)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("LoadToken = %q, %v; want %q, error %v", got, err, tc.want, tc.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), "test.tokenFile") {
				t.Fatalf("error %v does not name the setting", err)
			}
			if err != nil && strings.Contains(err.Error(), "from-") {
				t.Fatalf("error reveals a token: %v", err)
			}
		})
	}
}

// Each guard takes only its own token: a client that sends the service
// token on every call (Credentials) passes the service's guard and is
// refused by the admin guard, which names its token.
func TestGuardsKeepTokensApart(t *testing.T) {
	const serviceToken = "service-t0ken-value"
	conn := serve(t,
		auth.NewBearer("admin", "/"+adminv1.AdminService_ServiceDesc.ServiceName+"/", token),
		auth.NewBearer("service", "/grpc.health.v1.Health/", serviceToken))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unauthenticated ||
		!strings.Contains(status.Convert(err).Message(), "service call") {
		t.Fatalf("service call without a token: %v, want Unauthenticated naming the service token", err)
	}
	withToken, err := grpc.NewClient(conn.Target(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(auth.Credentials(serviceToken)))
	if err != nil {
		t.Fatal(err)
	}
	defer withToken.Close()
	if _, err := healthpb.NewHealthClient(withToken).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("service call with the service token: %v", err)
	}
	_, err = adminv1.NewAdminServiceClient(withToken).ListBuckets(ctx, &adminv1.ListBucketsRequest{})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), "admin token") {
		t.Fatalf("admin call with the service token: %v, want PermissionDenied naming the admin token", err)
	}
	if _, err := adminv1.NewAdminServiceClient(conn).ListBuckets(withAuth(ctx, "Bearer "+token), &adminv1.ListBucketsRequest{}); err != nil {
		t.Fatalf("admin call with the admin token: %v", err)
	}
}

// A token is rotated without a window of refusals: a server configured
// with "new old" takes both, and a client configured with "new old" (the
// same Secret) sends the first.
func TestRotation(t *testing.T) {
	conn := serve(t, auth.NewBearer("service", "/grpc.health.v1.Health/", "new-token\nold-token"))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, tc := range []struct {
		header string
		want   codes.Code
	}{{"Bearer new-token", codes.OK}, {"Bearer old-token", codes.OK}, {"Bearer other", codes.PermissionDenied}, {"Bearer new-token old-token", codes.PermissionDenied}} {
		if _, err := healthpb.NewHealthClient(conn).Check(withAuth(ctx, tc.header), &healthpb.HealthCheckRequest{}); status.Code(err) != tc.want {
			t.Fatalf("%q: %v, want %v", tc.header, err, tc.want)
		}
	}
	if got := auth.First(" new-token \n old-token\n"); got != "new-token" {
		t.Fatalf("First = %q, want new-token", got)
	}
	if b := auth.NewBearer("svc", "/svc/", " \n "); b.Check(metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer x")), "/svc/M") == nil {
		t.Fatal("a Bearer without tokens let a call in")
	}
}
