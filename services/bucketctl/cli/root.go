// Package cli holds bucketctl's commands.
package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
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
	upTLS, allocTLS tlsFlags // to the upload service, to the allocator (admin commands)
	out, errOut     io.Writer
}

// tlsFlags say how to reach a service over TLS: a CA to trust (else the
// system's), a client certificate for mutual TLS, and the name the
// server's certificate must carry (else the dialled host). TLS is on when
// --tls (or --allocator-tls) says so, or, when that is not given, when any
// file or name is.
type tlsFlags struct {
	on                        bool
	onSet                     func() bool // --tls given, or its variable set
	ca, cert, key, serverName string
}

func (f tlsFlags) credentials() (credentials.TransportCredentials, error) {
	on := f.on
	if !f.onSet() {
		on = f.ca != "" || f.cert != "" || f.key != "" || f.serverName != ""
	}
	return tlsfiles.DialCredentials(on, f.ca, f.cert, f.key, f.serverName, nil)
}

// add registers the flags under prefix ("tls" or "allocator-tls") and
// their environment variables under envPrefix.
func (f *tlsFlags) add(pf *pflag.FlagSet, prefix, envPrefix, service string) {
	env, envErr := strconv.ParseBool(os.Getenv(envPrefix))
	pf.BoolVar(&f.on, prefix, env, "reach the "+service+" over TLS (false: plain text, whatever files are given); trusts the system's CAs unless --"+prefix+"-ca is given (env "+envPrefix+")")
	f.onSet = func() bool { return pf.Changed(prefix) || envErr == nil }
	pf.StringVar(&f.ca, prefix+"-ca", os.Getenv(envPrefix+"_CA"), "reach the "+service+" over TLS, trusting this CA file (env "+envPrefix+"_CA)")
	pf.StringVar(&f.cert, prefix+"-cert", os.Getenv(envPrefix+"_CERT"), "client certificate for mutual TLS with the "+service+" (env "+envPrefix+"_CERT)")
	pf.StringVar(&f.key, prefix+"-key", os.Getenv(envPrefix+"_KEY"), "key of --"+prefix+"-cert (env "+envPrefix+"_KEY)")
	pf.StringVar(&f.serverName, prefix+"-server-name", os.Getenv(envPrefix+"_SERVER_NAME"), "name the "+service+"'s certificate must carry, when it differs from the address's host (env "+envPrefix+"_SERVER_NAME)")
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
	g.upTLS.add(pf, "tls", "BUCKETLB_TLS", "upload service")
	g.allocTLS.add(pf, "allocator-tls", "BUCKETLB_ALLOCATOR_TLS", "allocator")
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
	creds, err := g.upTLS.credentials()
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
