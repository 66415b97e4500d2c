package tlsfiles

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// ServerOptions serves a gRPC server over TLS (see Server) when certFile
// is set, and in plain text (no options) when it is empty.
func ServerOptions(certFile, keyFile, clientCAFile string, log *slog.Logger) ([]grpc.ServerOption, error) {
	if certFile == "" {
		return nil, nil
	}
	tc, err := Server(certFile, keyFile, clientCAFile, log)
	if err != nil {
		return nil, err
	}
	return []grpc.ServerOption{grpc.Creds(credentials.NewTLS(tc))}, nil
}

// DialCredentials are plain text unless enabled; then TLS trusting caFile,
// presenting certFile/keyFile when given (see Client), and expecting
// serverName in the server's certificate (empty: the dialled host). A
// rotation of the files that cannot be loaded is logged to log (nil: not
// logged); the last good files stay in use.
func DialCredentials(enabled bool, caFile, certFile, keyFile, serverName string, log *slog.Logger) (credentials.TransportCredentials, error) {
	if !enabled {
		return insecure.NewCredentials(), nil
	}
	tc, cas, err := client(caFile, certFile, keyFile, log)
	if err != nil {
		return nil, err
	}
	tc.ServerName = serverName
	if cas == nil {
		return credentials.NewTLS(tc), nil
	}
	return &rotatingRoots{TransportCredentials: credentials.NewTLS(tc), cfg: tc, cas: cas}, nil
}

// rotatingRoots are TLS credentials whose handshakes trust the CA bundle
// as its file holds it now: a long-running client (the upload service
// dialling the allocator) must follow a CA rotation, which crypto/tls's
// fixed RootCAs would not.
type rotatingRoots struct {
	credentials.TransportCredentials
	cfg *tls.Config
	cas *reloading[*x509.CertPool]
}

func (r *rotatingRoots) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	cfg := r.cfg.Clone()
	roots, err := r.cas.get()
	if err != nil {
		return nil, nil, err
	}
	cfg.RootCAs = roots
	return credentials.NewTLS(cfg).ClientHandshake(ctx, authority, conn)
}

func (r *rotatingRoots) Clone() credentials.TransportCredentials {
	return &rotatingRoots{TransportCredentials: r.TransportCredentials.Clone(), cfg: r.cfg, cas: r.cas}
}
