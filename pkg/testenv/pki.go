package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/tlsfiles"
)

// PKI is a throw-away certificate authority whose files live in a test's
// temporary directory.
type PKI struct {
	// CAFile is the CA certificate, PEM.
	CAFile string
	dir    string
	ca     *x509.Certificate
	key    *ecdsa.PrivateKey
	serial int64
}

// NewPKI makes a CA.
func NewPKI(tb testing.TB) *PKI {
	tb.Helper()
	key := newKey(tb)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bucketlb test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	p := &PKI{dir: tb.TempDir(), ca: ca, key: key, serial: 1}
	p.CAFile = filepath.Join(p.dir, "ca.pem")
	writePEM(tb, p.CAFile, "CERTIFICATE", der)
	return p
}

// Issue writes a certificate for name, valid for server and client use,
// with the given DNS names or IP addresses and URI names (SPIFFE ids), to
// name.pem and name-key.pem, and returns their paths. Issuing the same
// name again replaces the files, as a rotation does.
func (p *PKI) Issue(tb testing.TB, name string, hosts []string, uris ...string) (certFile, keyFile string) {
	tb.Helper()
	key := newKey(tb)
	p.serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	for _, u := range uris {
		parsed, err := url.Parse(u)
		if err != nil {
			tb.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.key)
	if err != nil {
		tb.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	certFile, keyFile = filepath.Join(p.dir, name+".pem"), filepath.Join(p.dir, name+"-key.pem")
	writePEM(tb, keyFile, "EC PRIVATE KEY", kder)
	writePEM(tb, certFile, "CERTIFICATE", der)
	return certFile, keyFile
}

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return key
}

func writePEM(tb testing.TB, path, kind string, der []byte) {
	tb.Helper()
	// Written aside and renamed, as a secret volume swaps its files.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		tb.Fatal(err)
	}
}

// MutualTLS is a server configuration for 127.0.0.1 with a certificate
// issued to name, requiring clients to present a certificate this PKI
// signed, built as the services build theirs (tlsfiles.Server).
func (p *PKI) MutualTLS(tb testing.TB, name string) *tls.Config {
	tb.Helper()
	certFile, keyFile := p.Issue(tb, name, []string{"127.0.0.1"})
	cfg, err := tlsfiles.Server(certFile, keyFile, p.CAFile, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return cfg
}
