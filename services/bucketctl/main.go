// Command bucketctl is the operator and developer CLI of bucketlb: `dev`
// runs the whole system in one process, `upload`/`get` move files, and
// `status`/`buckets` drive the admin API.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

	"github.com/bucketlb/bucketlb/services/bucketctl/cli"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	var got atomic.Value // the signal that ended ctx
	go func() {
		// The first signal asks the command to stop cleanly (a running
		// upload releases what it holds); a second one ends the process.
		got.Store(<-sigs)
		signal.Stop(sigs)
		cancel()
	}()
	root := cli.NewRoot(os.Stdout, os.Stderr)
	root.Version = version
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "bucketctl:", cli.Describe(err))
		if sig, ok := got.Load().(syscall.Signal); ok {
			os.Exit(128 + int(sig)) // as shells report a process a signal ended
		}
		os.Exit(1)
	}
}
