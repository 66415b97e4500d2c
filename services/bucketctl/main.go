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
	go func() {
		// The first Ctrl-C asks the command to stop cleanly (a running
		// upload releases what it holds); a second one ends the process.
		<-ctx.Done()
		stop()
	}()
	root := cli.NewRoot(os.Stdout, os.Stderr)
	root.Version = version
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "bucketctl:", err)
		if ctx.Err() != nil {
			os.Exit(130) // interrupted, as shells report it
		}
		os.Exit(1)
	}
}
