// Package cli holds bucketctl's commands.
package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/auth"
	"github.com/bucketlb/bucketlb/pkg/tlsfiles"
)

// Default addresses match `bucketctl dev`.
const (
	defaultUploadAddr    = "127.0.0.1:7002"
	defaultAllocatorAddr = "127.0.0.1:7001"
)

type globals struct {
	uploadAddr    string
	allocatorAddr string
	token         string // BUCKETLB_ADMIN_TOKEN
	tokenFile     string
	// tokenFileSet is --token-file given on the command line: it then
	// wins over BUCKETLB_ADMIN_TOKEN, which wins over the default file.
	tokenFileSet func() bool
	timeout      time.Duration
	// TLS to the upload service: a CA to trust (else the system's) and a
	// client certificate for mutual TLS.
	tlsCA, tlsCert, tlsKey string
	// The same for the allocator (admin commands).
	allocTLSCA, allocTLSCert, allocTLSKey string
	out, errOut                           io.Writer
}

// NewRoot builds the command tree writing to out and errOut.
func NewRoot(out, errOut io.Writer) *cobra.Command {
	g := &globals{out: out, errOut: errOut}
	root := &cobra.Command{
		Use:           "bucketctl",
		Short:         "Upload to, read from and administer bucketlb",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(out)
	root.SetErr(errOut)
	pf := root.PersistentFlags()
	pf.StringVar(&g.uploadAddr, "upload-addr", envOr("BUCKETLB_UPLOAD_ADDR", defaultUploadAddr), "upload service gRPC address (env BUCKETLB_UPLOAD_ADDR)")
	pf.StringVar(&g.allocatorAddr, "allocator-addr", envOr("BUCKETLB_ALLOCATOR_ADDR", defaultAllocatorAddr), "allocator service gRPC address, for admin commands (env BUCKETLB_ALLOCATOR_ADDR)")
	pf.StringVar(&g.tokenFile, "token-file", envOr("BUCKETLB_ADMIN_TOKEN_FILE", filepath.Join(".data", "admin-token")), "file holding the admin token (env BUCKETLB_ADMIN_TOKEN_FILE; env BUCKETLB_ADMIN_TOKEN, the token itself, wins over the default but not over this flag)")
	pf.DurationVar(&g.timeout, "timeout", 0, "overall deadline for the command (0 = none for transfers, 10s for admin calls)")
	pf.StringVar(&g.tlsCA, "tls-ca", os.Getenv("BUCKETLB_TLS_CA"), "reach the upload service over TLS, trusting this CA file (env BUCKETLB_TLS_CA)")
	pf.StringVar(&g.tlsCert, "tls-cert", os.Getenv("BUCKETLB_TLS_CERT"), "client certificate for mutual TLS with the upload service (env BUCKETLB_TLS_CERT)")
	pf.StringVar(&g.tlsKey, "tls-key", os.Getenv("BUCKETLB_TLS_KEY"), "key of --tls-cert (env BUCKETLB_TLS_KEY)")
	pf.StringVar(&g.allocTLSCA, "allocator-tls-ca", os.Getenv("BUCKETLB_ALLOCATOR_TLS_CA"), "reach the allocator over TLS, trusting this CA file (env BUCKETLB_ALLOCATOR_TLS_CA)")
	pf.StringVar(&g.allocTLSCert, "allocator-tls-cert", os.Getenv("BUCKETLB_ALLOCATOR_TLS_CERT"), "client certificate for mutual TLS with the allocator (env BUCKETLB_ALLOCATOR_TLS_CERT)")
	pf.StringVar(&g.allocTLSKey, "allocator-tls-key", os.Getenv("BUCKETLB_ALLOCATOR_TLS_KEY"), "key of --allocator-tls-cert (env BUCKETLB_ALLOCATOR_TLS_KEY)")
	g.token = auth.First(os.Getenv("BUCKETLB_ADMIN_TOKEN"))
	g.tokenFileSet = func() bool { return pf.Changed("token-file") }

	root.AddCommand(
		newDevCmd(g),
		newUploadCmd(g),
		newGetCmd(g),
		newDeleteCmd(g),
		newStatusCmd(g),
		newBucketsCmd(g),
	)
	return root
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func dial(addr string, creds credentials.TransportCredentials) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds),
		// Pings find a peer gone silent (a partition, a frozen node),
		// which a transfer with no --timeout would otherwise wait on for
		// good. The servers allow a ping every 10 s.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second}))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	return conn, nil
}

// adminContext adds the bearer token and a deadline.
func (g *globals) adminContext(ctx context.Context) (context.Context, context.CancelFunc, error) {
	tok := g.token
	if tok == "" || g.tokenFileSet() {
		data, err := os.ReadFile(g.tokenFile)
		if err != nil {
			return nil, nil, fmt.Errorf("no admin token: set BUCKETLB_ADMIN_TOKEN or --token-file (%w)", err)
		}
		if tok = auth.First(string(data)); tok == "" {
			return nil, nil, fmt.Errorf("no admin token: the token file %s is empty", g.tokenFile)
		}
	}
	timeout := g.timeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok), cancel, nil
}

// uploadClient dials the upload service and applies --timeout (none by
// default: transfers take as long as they take). Call done when finished.
func (g *globals) uploadClient(ctx context.Context) (context.Context, uploadv1.UploadServiceClient, func(), error) {
	// Plain text unless asked: bucketlb runs inside the cluster network
	// (or on loopback in dev), where a mesh may provide TLS instead.
	creds, err := tlsfiles.DialCredentials(g.tlsCA != "" || g.tlsCert != "" || g.tlsKey != "", g.tlsCA, g.tlsCert, g.tlsKey, "")
	if err != nil {
		return nil, nil, nil, err
	}
	conn, err := dial(g.uploadAddr, creds)
	if err != nil {
		return nil, nil, nil, err
	}
	cancel := func() {}
	if g.timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, g.timeout)
	}
	return ctx, uploadv1.NewUploadServiceClient(conn), func() { cancel(); conn.Close() }, nil
}
