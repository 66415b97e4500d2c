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

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := cli.NewRoot(os.Stdout, os.Stderr).ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "bucketctl:", err)
		os.Exit(1)
	}
}
