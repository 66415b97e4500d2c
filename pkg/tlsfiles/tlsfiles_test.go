package tlsfiles_test

import (
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/tlsfiles"
)

// serve accepts TLS connections with cfg until the test ends, and sends a
// byte on each whose handshake succeeds.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				if c.(*tls.Conn).Handshake() == nil {
					_, _ = c.Write([]byte{1})
				}
				_ = c.Close()
			}(c)
		}
	}()
	return lis.Addr().String()
}

// dial completes a handshake and returns the server's certificate serial.
func dial(addr string, cfg *tls.Config) (int64, error) {
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64(), nil
}

// A certificate rotated on disk is served from the next handshake on,
// without a restart; with a client CA, a client without a certificate
// that CA signed is turned away.
func TestRotationAndClientCertificates(t *testing.T) {
	pki := testenv.NewPKI(t)
	certFile, keyFile := pki.Issue(t, "server", []string{"127.0.0.1"})
	srv, err := tlsfiles.Server(certFile, keyFile, pki.CAFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, srv)
	cc, ck := pki.Issue(t, "client", nil, "spiffe://test/client")
	client, err := tlsfiles.Client(pki.CAFile, cc, ck)
	if err != nil {
		t.Fatal(err)
	}
	first, err := dial(addr, client)
	if err != nil {
		t.Fatal(err)
	}
	pki.Issue(t, "server", []string{"127.0.0.1"}) // rotation
	second, err := dial(addr, client)
	if err != nil {
		t.Fatal(err)
	}
	if second == first {
		t.Fatalf("still serving certificate %d after it was rotated on disk", first)
	}
	anonymous, err := tlsfiles.Client(pki.CAFile, "", "")
	if err != nil {
		t.Fatal(err)
	}
	// TLS 1.3 reports a refused client certificate on the first read.
	c, err := tls.Dial("tcp", addr, anonymous)
	if err == nil {
		_, err = c.Read(make([]byte, 1))
		_ = c.Close()
	}
	if err == nil {
		t.Fatal("a client without a certificate was let in")
	}
	if _, err := tlsfiles.Client(pki.CAFile, cc, ""); err == nil {
		t.Fatal("a client certificate without its key was accepted")
	}
}

// A rotation that leaves a key not matching its certificate keeps the last
// good certificate in service and says so once in the log, however many
// handshakes follow; the next good rotation is served.
func TestMismatchedRotationIsLoggedOnce(t *testing.T) {
	pki := testenv.NewPKI(t)
	certFile, keyFile := pki.Issue(t, "server", []string{"127.0.0.1"})
	var logs testenv.LogBuffer
	srv, err := tlsfiles.Server(certFile, keyFile, "", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, srv)
	client, err := tlsfiles.Client(pki.CAFile, "", "")
	if err != nil {
		t.Fatal(err)
	}
	first, err := dial(addr, client)
	if err != nil {
		t.Fatal(err)
	}
	oldKey, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	pki.Issue(t, "server", []string{"127.0.0.1"})
	if err := os.WriteFile(keyFile, oldKey, 0o600); err != nil { // the new certificate with the old key
		t.Fatal(err)
	}
	for range 3 {
		got, err := dial(addr, client)
		if err != nil {
			t.Fatalf("handshake during a broken rotation: %v", err)
		}
		if got != first {
			t.Fatalf("served certificate %d, want the last good one, %d", got, first)
		}
	}
	if n := strings.Count(logs.String(), "cannot be loaded"); n != 1 {
		t.Fatalf("the broken rotation was logged %d times, want once:\n%s", n, logs.String())
	}
	pki.Issue(t, "server", []string{"127.0.0.1"})
	if got, err := dial(addr, client); err != nil || got == first {
		t.Fatalf("after a good rotation: certificate %d (the old one is %d), error %v", got, first, err)
	}
}
