package tlsfiles_test

import (
	"crypto/tls"
	"net"
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
	srv, err := tlsfiles.Server(certFile, keyFile, pki.CAFile)
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
