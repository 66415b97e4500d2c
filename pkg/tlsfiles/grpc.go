package tlsfiles

import (
	"log/slog"

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
// serverName in the server's certificate (empty: the dialled host).
func DialCredentials(enabled bool, caFile, certFile, keyFile, serverName string) (credentials.TransportCredentials, error) {
	if !enabled {
		return insecure.NewCredentials(), nil
	}
	tc, err := Client(caFile, certFile, keyFile)
	if err != nil {
		return nil, err
	}
	tc.ServerName = serverName
	return credentials.NewTLS(tc), nil
}
