// Package s3gw runs a real S3-compatible gateway (versitygw) in-process over
// a POSIX directory, for the dev stack and for tests.
//
// Two facts of versitygw shape this package:
//   - only one gateway may run per process (a second RunVersityGW fails), and
//   - its POSIX backend changes the process working directory to the data
//     directory and resolves buckets relative to it. Every path a process
//     needs after Start must therefore be absolute.
package s3gw

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/versity/versitygw/backend/meta"
	"github.com/versity/versitygw/backend/posix"
	"github.com/versity/versitygw/embedgw"
)

// Options configure a gateway.
type Options struct {
	// Dir holds one sub-directory per bucket. Created if missing.
	Dir string
	// Addr is the listen address; "127.0.0.1:0" (or empty) picks a free port.
	Addr string
	// AccessKey and SecretKey are the root credentials. Defaults are used
	// when empty.
	AccessKey string
	SecretKey string
	// TLS serves HTTPS with a self-signed certificate for 127.0.0.1 and
	// localhost, written as PEM to Dir/../<base>-tls/.
	TLS bool
}

// Gateway is a running S3 gateway.
type Gateway struct {
	// Endpoint is the base URL, e.g. http://127.0.0.1:40123.
	Endpoint string
	// AccessKey and SecretKey are the root credentials.
	AccessKey string
	SecretKey string
	// Region is the signing region the gateway expects.
	Region string
	// CAFile is the PEM certificate clients must trust when TLS is on.
	CAFile string
	// Dir is the absolute data directory.
	Dir string

	cancel context.CancelFunc
	done   chan error

	mu         sync.Mutex
	transports []*http.Transport // of clients handed out, closed first
}

// Default credentials of the dev gateway. They guard only a loopback port.
const (
	DefaultAccessKey = "bucketlb-dev"
	DefaultSecretKey = "bucketlb-dev-secret"
	Region           = "us-east-1"
)

// Start launches the gateway and waits until it accepts connections.
func Start(ctx context.Context, opts Options) (*Gateway, error) {
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("s3gw: resolve data dir: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("s3gw: create data dir: %w", err)
	}
	g := &Gateway{
		AccessKey: opts.AccessKey,
		SecretKey: opts.SecretKey,
		Region:    Region,
		Dir:       dir,
		done:      make(chan error, 1),
	}
	if g.AccessKey == "" {
		g.AccessKey = DefaultAccessKey
	}
	if g.SecretKey == "" {
		g.SecretKey = DefaultSecretKey
	}
	addr, err := resolveAddr(opts.Addr)
	if err != nil {
		return nil, err
	}
	cfg := &embedgw.Config{
		RootUserAccess:    g.AccessKey,
		RootUserSecret:    g.SecretKey,
		Region:            g.Region,
		Ports:             []string{addr},
		MaxConnections:    4096,
		MaxRequests:       4096,
		MultipartMaxParts: 10000,
		Quiet:             true,
		KeepAlive:         true,
	}
	scheme := "http"
	if opts.TLS {
		tlsDir := filepath.Join(filepath.Dir(dir), filepath.Base(dir)+"-tls")
		certFile, keyFile, err := writeSelfSigned(tlsDir)
		if err != nil {
			return nil, err
		}
		cfg.CertFile, cfg.KeyFile = certFile, keyFile
		g.CAFile = certFile
		scheme = "https"
	}
	g.Endpoint = scheme + "://" + addr

	be, err := posix.New(dir, meta.XattrMeta{}, posix.PosixOpts{NewDirPerm: 0o755, Concurrency: 5000})
	if err != nil {
		return nil, fmt.Errorf("s3gw: open posix backend at %s: %w", dir, err)
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	g.cancel = cancel
	go func() { g.done <- embedgw.RunVersityGW(runCtx, be, cfg) }()

	if err := waitListening(ctx, addr, g.done); err != nil {
		cancel()
		return nil, err
	}
	return g, nil
}

// Close stops the gateway and waits for it to exit.
func (g *Gateway) Close() error {
	g.mu.Lock()
	for _, tr := range g.transports {
		tr.CloseIdleConnections()
	}
	g.mu.Unlock()
	g.cancel()
	select {
	case err := <-g.done:
		if err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("s3gw: stop: %w", err)
		}
	case <-time.After(30 * time.Second):
		return errors.New("s3gw: gateway did not stop within 30s")
	}
	return nil
}

func resolveAddr(addr string) (string, error) {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("s3gw: bad listen address %q: %w", addr, err)
	}
	if port != "0" {
		// versitygw reports a bind error only when it stops, and another
		// S3 server on the port would pass for it: check the port is free.
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return "", fmt.Errorf("s3gw: cannot listen on %s (another process has it? choose another address): %w", addr, err)
		}
		_ = l.Close()
		return addr, nil
	}
	// versitygw takes addresses, not listeners, and reports no bound port:
	// pick a free one and hand it over. The tiny race with another process
	// is acceptable for dev and tests on loopback.
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", fmt.Errorf("s3gw: pick free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func waitListening(ctx context.Context, addr string, done <-chan error) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case err := <-done:
			return fmt.Errorf("s3gw: gateway exited during start: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("s3gw: gateway not listening on %s after 10s", addr)
		}
	}
}

// writeSelfSigned writes a fresh certificate for loopback names, reusing
// one already present so clients of a restarted dev stack keep trusting it.
func writeSelfSigned(dir string) (certFile, keyFile string, err error) {
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if _, err1 := os.Stat(certFile); err1 == nil {
		if _, err2 := os.Stat(keyFile); err2 == nil {
			return certFile, keyFile, nil
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", fmt.Errorf("s3gw: create tls dir: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("s3gw: generate key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "bucketlb dev s3"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", fmt.Errorf("s3gw: create certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", fmt.Errorf("s3gw: marshal key: %w", err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return "", "", fmt.Errorf("s3gw: write cert: %w", err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return "", "", fmt.Errorf("s3gw: write key: %w", err)
	}
	return certFile, keyFile, nil
}
