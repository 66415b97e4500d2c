// Package tlsfiles builds TLS configurations for gRPC servers and clients
// from PEM files. Each handshake checks whether a file changed and reads it
// again if so, so certificates rotated on disk (cert-manager, a mesh's CA)
// take effect without a restart.
package tlsfiles

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
)

// Server is a server configuration presenting certFile/keyFile. With
// clientCAFile, every client must present a certificate that CA signed
// (mTLS); its names then identify the client (see ratelimit.ClientID).
// A rotation that cannot be loaded is logged to log (nil: not logged).
func Server(certFile, keyFile, clientCAFile string, log *slog.Logger) (*tls.Config, error) {
	kp, err := keyPair(certFile, keyFile, log)
	if err != nil {
		return nil, err
	}
	base := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2"}, // what gRPC's credentials set; a config from GetConfigForClient must too
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return kp.get() },
	}
	if clientCAFile == "" {
		return base, nil
	}
	cas, err := caPool(clientCAFile, log)
	if err != nil {
		return nil, err
	}
	cfg := base.Clone()
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		p, err := cas.get()
		if err != nil {
			return nil, err
		}
		c := base.Clone()
		c.ClientCAs, c.ClientAuth = p, tls.RequireAndVerifyClientCert
		return c, nil
	}
	// Used only if GetConfigForClient is bypassed: fail closed.
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	cfg.ClientCAs, _ = cas.get()
	return cfg, nil
}

// Client is a client configuration trusting caFile (the system's roots
// when empty) and presenting certFile/keyFile when given.
func Client(caFile, certFile, keyFile string) (*tls.Config, error) {
	cfg, _, err := client(caFile, certFile, keyFile, nil)
	return cfg, err
}

// client is Client, with the CA bundle for callers that follow its
// rotation (nil without caFile).
func client(caFile, certFile, keyFile string, log *slog.Logger) (*tls.Config, *reloading[*x509.CertPool], error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	var cas *reloading[*x509.CertPool]
	if caFile != "" {
		var err error
		if cas, err = caPool(caFile, log); err != nil {
			return nil, nil, err
		}
		cfg.RootCAs, _ = cas.get()
	}
	if (certFile == "") != (keyFile == "") {
		return nil, nil, errors.New("tlsfiles: a client certificate needs both its certificate and its key file")
	}
	if certFile != "" {
		kp, err := keyPair(certFile, keyFile, log)
		if err != nil {
			return nil, nil, err
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return kp.get() }
	}
	return cfg, cas, nil
}

// keyPair is a certificate and its key, read now and again when either
// file changes.
func keyPair(certFile, keyFile string, log *slog.Logger) (*reloading[*tls.Certificate], error) {
	r := &reloading[*tls.Certificate]{files: []string{certFile, keyFile}, log: log, load: func() (*tls.Certificate, error) {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("tlsfiles: load %s and %s: %w", certFile, keyFile, err)
		}
		return &c, nil
	}}
	_, err := r.get()
	return r, err
}

// caPool is a CA bundle, read now and again when its file changes.
func caPool(file string, log *slog.Logger) (*reloading[*x509.CertPool], error) {
	r := &reloading[*x509.CertPool]{files: []string{file}, log: log, load: func() (*x509.CertPool, error) {
		pem, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("tlsfiles: %w", err)
		}
		p := x509.NewCertPool()
		if !p.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tlsfiles: no certificate in %s", file)
		}
		return p, nil
	}}
	_, err := r.get()
	return r, err
}

// reloading is a value loaded from files, loaded again when one of them
// changes (size or modification time). A load that fails keeps the last
// good value in service: mid-rotation one file may be new and the other
// not yet, or the files briefly gone. A version that failed is not loaded
// again on every handshake, and is logged once: a rotation that never
// completes (a key that does not match its certificate) would otherwise
// go unseen until the old certificate expires.
type reloading[T any] struct {
	files []string
	load  func() (T, error)
	log   *slog.Logger

	mu      sync.Mutex
	version string
	val     T
	loaded  bool
	failed  string // the version whose load failed last
	lastErr error
}

func (r *reloading[T]) get() (T, error) {
	v, err := stamp(r.files...)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil && r.loaded && v == r.version {
		return r.val, nil
	}
	switch {
	case err != nil:
		v = "unreadable: " + err.Error()
	case v == r.failed:
		err = r.lastErr
	default:
		var val T
		if val, err = r.load(); err == nil {
			r.val, r.version, r.loaded, r.failed = val, v, true, ""
			return val, nil
		}
	}
	if v != r.failed {
		r.failed, r.lastErr = v, err
		if r.loaded && r.log != nil {
			r.log.Warn("TLS files changed but cannot be loaded; the last good ones stay in service", "files", r.files, "error", err.Error())
		}
	}
	if r.loaded {
		return r.val, nil
	}
	return r.val, err
}

// stamp identifies the files' versions by size and modification time.
func stamp(files ...string) (string, error) {
	s := ""
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			return "", fmt.Errorf("tlsfiles: %w", err)
		}
		s += fmt.Sprintf("%d/%d;", fi.Size(), fi.ModTime().UnixNano())
	}
	return s, nil
}
