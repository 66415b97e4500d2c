package testenv

import (
	"os"
	"testing"
	"time"
)

// SyncLatency is the mean time of a 4 KiB write followed by fsync in dir,
// over n of them: what etcd pays for each WAL entry it makes durable.
// Benchmarks print it beside figures that wait for etcd writes, since it
// differs several times over between machines.
func SyncLatency(tb testing.TB, dir string, n int) time.Duration {
	tb.Helper()
	f, err := os.CreateTemp(dir, "sync-probe-")
	if err != nil {
		tb.Fatalf("sync probe: %v", err)
	}
	defer func() {
		_ = f.Close()
		_ = os.Remove(f.Name())
	}()
	block := make([]byte, 4096)
	start := time.Now()
	for range n {
		if _, err := f.Write(block); err != nil {
			tb.Fatalf("sync probe: %v", err)
		}
		if err := f.Sync(); err != nil {
			tb.Fatalf("sync probe: %v", err)
		}
	}
	return time.Since(start) / time.Duration(n)
}
