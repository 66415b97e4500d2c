// Command bucketctl is the operator and developer CLI of bucketlb: `dev`
// runs the whole system in one process, `upload`/`get` move files, and
// `status`/`buckets` drive the admin API.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/bucketlb/bucketlb/services/bucketctl/cli"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := cli.NewRoot(os.Stdout, os.Stderr)
	root.Version = version
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "bucketctl:", err)
		os.Exit(1)
	}
}
