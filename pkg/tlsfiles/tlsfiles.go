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
	"os"
	"sync"
)

// Server is a server configuration presenting certFile/keyFile. With
// clientCAFile, every client must present a certificate that CA signed
// (mTLS); its names then identify the client (see ratelimit.ClientID).
func Server(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	kp := &keyPair{certFile: certFile, keyFile: keyFile}
	if _, err := kp.get(); err != nil {
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
	cas := &pool{file: clientCAFile}
	if _, err := cas.get(); err != nil {
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
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		p, err := (&pool{file: caFile}).get()
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = p
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("tlsfiles: a client certificate needs both its certificate and its key file")
	}
	if certFile != "" {
		kp := &keyPair{certFile: certFile, keyFile: keyFile}
		if _, err := kp.get(); err != nil {
			return nil, err
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return kp.get() }
	}
	return cfg, nil
}

// stamp identifies a file's version by size and modification time.
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

// keyPair is a certificate and its key, read again when either changes.
type keyPair struct {
	certFile, keyFile string

	mu      sync.Mutex
	version string
	cert    *tls.Certificate
}

func (k *keyPair) get() (*tls.Certificate, error) {
	v, err := stamp(k.certFile, k.keyFile)
	k.mu.Lock()
	defer k.mu.Unlock()
	if err == nil && v == k.version {
		return k.cert, nil
	}
	if err == nil {
		var c tls.Certificate
		if c, err = tls.LoadX509KeyPair(k.certFile, k.keyFile); err == nil {
			k.cert, k.version = &c, v
			return k.cert, nil
		}
		err = fmt.Errorf("tlsfiles: load %s and %s: %w", k.certFile, k.keyFile, err)
	}
	if k.cert != nil {
		// Mid-rotation (one file written, not yet the other), or gone:
		// the last good pair serves until the files make sense again.
		return k.cert, nil
	}
	return nil, err
}

// pool is a CA bundle, read again when its file changes.
type pool struct {
	file string

	mu      sync.Mutex
	version string
	p       *x509.CertPool
}

func (p *pool) get() (*x509.CertPool, error) {
	v, err := stamp(p.file)
	p.mu.Lock()
	defer p.mu.Unlock()
	if err == nil && v == p.version {
		return p.p, nil
	}
	if err == nil {
		var pem []byte
		if pem, err = os.ReadFile(p.file); err == nil {
			cp := x509.NewCertPool()
			if cp.AppendCertsFromPEM(pem) {
				p.p, p.version = cp, v
				return cp, nil
			}
			err = fmt.Errorf("tlsfiles: no certificate in %s", p.file)
		}
	}
	if p.p != nil {
		return p.p, nil // the last good bundle, as for a key pair
	}
	return nil, err
}
