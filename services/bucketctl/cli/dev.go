package cli

import (
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/config"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
)

func newDevCmd(g *globals) *cobra.Command {
	var (
		opts     devstack.Options
		logLevel string
	)
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run etcd, the allocator, the upload service and 3 local S3 buckets in one process",
		Long: `dev starts the whole system with embedded defaults: an embedded etcd server, the
allocator and the upload service on loopback gRPC ports, and three S3 buckets served by
an in-process versitygw gateway that keeps objects on disk. Data persists in --data-dir
across restarts. Ctrl-C stops everything cleanly.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			opts.Logger = slog.New(slog.NewTextHandler(g.errOut, &slog.HandlerOptions{Level: level}))
			// Before Start, which changes the process's working directory
			// (the S3 gateway's root): the token file as bucketctl finds
			// it by default, and as this stack keeps it.
			defaultToken, err := filepath.Abs(filepath.Join(".data", "admin-token"))
			if err != nil {
				return err
			}
			tokenFile, err := filepath.Abs(filepath.Join(opts.DataDir, "admin-token"))
			if err != nil {
				return err
			}
			if tokenFile == defaultToken {
				tokenFile = "" // no flag needed
			}
			ctx := cmd.Context()
			st, err := devstack.Start(ctx, opts)
			if err != nil {
				return err
			}
			// What etcd holds, not the configured seed: after the first
			// run, buckets changed through the admin API are the ones in
			// effect.
			buckets, err := st.StoredBuckets(ctx)
			if err != nil {
				fmt.Fprintf(g.errOut, "could not list the buckets in etcd (%v); showing the configured ones\n", err)
				buckets = st.Buckets
			}
			printBanner(g.out, st, buckets, tokenFile)
			<-ctx.Done()
			fmt.Fprintln(g.errOut, "\nstopping: draining gRPC servers, then S3 gateway and etcd...")
			if err := st.Close(); err != nil {
				return err
			}
			if err := st.Err(); err != nil {
				return err
			}
			fmt.Fprintln(g.errOut, "stopped cleanly")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.DataDir, "data-dir", ".data", "directory for etcd data, bucket contents and the admin token")
	f.StringVar(&opts.EtcdAddr, "etcd-addr", "127.0.0.1:23790", "embedded etcd client address")
	f.StringVar(&opts.AllocatorAddr, "allocator-listen", "127.0.0.1:7001", "allocator gRPC listen address")
	f.StringVar(&opts.UploadAddr, "upload-listen", "127.0.0.1:7002", "upload service gRPC listen address")
	f.StringVar(&opts.S3Addr, "s3-listen", "127.0.0.1:7070", "local S3 gateway listen address")
	f.BoolVar(&opts.S3TLS, "s3-tls", false, "serve the local S3 gateway over HTTPS (self-signed)")
	def := config.Defaults().Upload
	f.Float64Var(&opts.RateLimit, "rate-limit", def.RateLimit, "upload calls per second per client, as upload.rateLimit (0: no limit)")
	f.IntVar(&opts.RateBurst, "rate-burst", def.RateBurst, "burst of --rate-limit, as upload.rateBurst")
	f.Int64Var(&opts.ClientInFlightBytes, "client-in-flight-bytes", int64(def.ClientInFlightBytes), "bytes one client's running uploads may declare together, as upload.clientInFlightBytes (0: no bound)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}

func printBanner(w io.Writer, st *devstack.Stack, buckets []*adminv1.BucketSpec, tokenFile string) {
	example := "<bucket>"
	if len(buckets) > 0 {
		example = buckets[0].GetName()
	}
	fmt.Fprintf(w, `
bucketlb dev stack is running. Ctrl-C stops it.

  upload service   %[1]s   (gRPC, reflection on)
  allocator/admin  %[2]s   (gRPC, reflection on)
  etcd             %[3]s
  local S3         %[4]s   access key %[5]s, secret %[6]s, region %[7]s, path style
  buckets          %[8]s
  admin token      %[9]s   (stored in %[10]s)

Try it (second shell, from the repository root):
  head -c 20M /dev/urandom > /tmp/big.bin
  %[11]s upload /tmp/big.bin
  %[11]s get <bucket_id> <key> -o /tmp/back.bin && sha256sum /tmp/big.bin /tmp/back.bin
  %[11]s status

  make grpcurl   # installs bin/grpcurl
  bin/grpcurl -plaintext %[1]s list
  bin/grpcurl -plaintext -H "authorization: Bearer $(cat %[10]s)" %[2]s bucketlb.admin.v1.AdminService/GetStatus

Look inside the buckets with any S3 tool, e.g.
  AWS_ACCESS_KEY_ID=%[5]s AWS_SECRET_ACCESS_KEY=%[6]s aws --endpoint-url %[4]s s3 ls s3://%[12]s
`,
		st.UploadAddr, st.AllocatorAddr, st.Etcd.Endpoint,
		st.S3.Endpoint, st.S3.AccessKey, st.S3.SecretKey, st.S3.Region,
		bucketList(buckets), st.AdminToken, st.TokenFile,
		bucketctlCommand(st, tokenFile), example)
}

// bucketList is the banner's line of buckets: each with its priority,
// limit and, unless ACTIVE, its state.
func bucketList(buckets []*adminv1.BucketSpec) string {
	if len(buckets) == 0 {
		return "none: add one with bucketctl buckets put"
	}
	names := make([]string, 0, len(buckets))
	for _, b := range buckets {
		line := fmt.Sprintf("%s (priority %d, limit %s", b.GetId(), b.GetPriority(), human(b.GetMonthlyLimitBytes()))
		if b.GetState() != adminv1.BucketState_BUCKET_STATE_ACTIVE {
			line += ", " + stateName(b.GetState())
		}
		names = append(names, line+")")
	}
	return strings.Join(names, ", ")
}

// bucketctlCommand is how to call bucketctl against st: with its addresses
// and token file (tokenFile, "" for --token-file's default) as flags when
// they are not the defaults, since a command without them would reach
// another stack, or none.
func bucketctlCommand(st *devstack.Stack, tokenFile string) string {
	cmd := "bin/bucketctl"
	if st.UploadAddr != defaultUploadAddr {
		cmd += " --upload-addr " + st.UploadAddr
	}
	if st.AllocatorAddr != defaultAllocatorAddr {
		cmd += " --allocator-addr " + st.AllocatorAddr
	}
	if tokenFile != "" {
		cmd += " --token-file " + tokenFile
	}
	return cmd
}
