package tlsfiles_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/tlsfiles"
)

// serveHealth serves the gRPC health service with opts on loopback until
// the test ends, and returns its address.
func serveHealth(t *testing.T, opts []grpc.ServerOption) string {
	t.Helper()
	srv := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

// checkHealth makes one health check on a new connection to addr.
func checkHealth(addr string, creds credentials.TransportCredentials) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

// A gRPC server given ServerOptions with a client CA serves only clients
// whose DialCredentials present a certificate that CA signed and expect
// the name the server's certificate carries.
func TestGRPCOverMutualTLS(t *testing.T) {
	pki := testenv.NewPKI(t)
	cert, key := pki.Issue(t, "allocator", []string{"allocator.test"})
	opts, err := tlsfiles.ServerOptions(cert, key, pki.CAFile, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	addr := serveHealth(t, opts)
	check := func(enabled bool, ca, cert, key, serverName string) error {
		creds, err := tlsfiles.DialCredentials(enabled, ca, cert, key, serverName, nil)
		if err != nil {
			return err
		}
		return checkHealth(addr, creds)
	}
	cc, ck := pki.Issue(t, "upload", nil, "spiffe://test/upload")
	if err := check(true, pki.CAFile, cc, ck, "allocator.test"); err != nil {
		t.Fatalf("client with a certificate: %v", err)
	}
	for name, err := range map[string]error{
		"no client certificate": check(true, pki.CAFile, "", "", "allocator.test"),
		"plain text":            check(false, "", "", "", ""),
		"another server name":   check(true, pki.CAFile, cc, ck, "other.test"),
		"another CA":            check(true, testenv.NewPKI(t).CAFile, cc, ck, "allocator.test"),
	} {
		if err == nil {
			t.Errorf("%s: served", name)
		}
	}
	if err := check(true, pki.CAFile, cc, "", ""); err == nil || !strings.Contains(err.Error(), "both") {
		t.Errorf("a certificate without its key: %v, want an error asking for both", err)
	}
	if opts, err := tlsfiles.ServerOptions("", "", "", nil); err != nil || len(opts) != 0 {
		t.Errorf("no certificate: %d options, %v; want plain text", len(opts), err)
	}
}

// A long-running client follows a rotation of its CA file: after the
// server's certificate and the client's CA file both move to a new CA,
// the credentials built before still connect.
func TestDialCredentialsFollowACARotation(t *testing.T) {
	old, next := testenv.NewPKI(t), testenv.NewPKI(t)
	dir := t.TempDir()
	certFile, keyFile, caFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt")
	install := func(p *testenv.PKI) {
		t.Helper()
		c, k := p.Issue(t, "allocator", []string{"127.0.0.1"})
		for src, dst := range map[string]string{c: certFile, k: keyFile, p.CAFile: caFile} {
			data, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(dst, data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	install(old)
	opts, err := tlsfiles.ServerOptions(certFile, keyFile, "", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	addr := serveHealth(t, opts)
	var logged bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logged, nil))
	creds, err := tlsfiles.DialCredentials(true, caFile, "", "", "", log)
	if err != nil {
		t.Fatal(err)
	}
	// A new connection each time: a rotation concerns handshakes.
	if err := checkHealth(addr, creds); err != nil {
		t.Fatalf("before the rotation: %v", err)
	}
	install(next)
	if err := checkHealth(addr, creds); err != nil {
		t.Fatalf("after the CA rotation, the credentials built before: %v", err)
	}
	// A CA file that stops loading (a rotation gone wrong) is logged, and
	// the last good CA stays in service.
	if err := os.WriteFile(caFile, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := checkHealth(addr, creds); err != nil {
		t.Fatalf("with a broken CA file, the last good CA: %v", err)
	}
	if !strings.Contains(logged.String(), caFile) {
		t.Fatalf("a CA file that no longer loads was not logged (log: %q)", logged.String())
	}
}
