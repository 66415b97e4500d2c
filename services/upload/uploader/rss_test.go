package uploader_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

const helperAllocatorEnv = "BUCKETLB_HELPER_ALLOCATOR_ADDR"

// TestHelperUploadServer is not a test: BenchmarkServiceOverhead runs it
// in a child process, an upload service alone in its process as in
// production, to read that process's peak RSS. It prints its address and
// serves until its stdin closes.
func TestHelperUploadServer(t *testing.T) {
	addr := os.Getenv(helperAllocatorEnv)
	if addr == "" {
		t.Skip("runs only as BenchmarkServiceOverhead's upload service process")
	}
	conn, err := grpc.NewClient(addr, append(uploader.AllocatorDialOptions(serviceToken),
		grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	up, err := uploader.New(uploader.Config{
		// The sink takes any signature.
		Credentials:         objstore.StaticCredentials{"GW": {"sink", "sink"}},
		AllowedContentTypes: []string{"application/octet-stream"},
	}, allocatorv1.NewAllocatorServiceClient(conn), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(up.ServerOptions()...)
	up.Register(srv)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	fmt.Printf("ADDR %s\n", lis.Addr())
	_, _ = io.Copy(io.Discard, os.Stdin)
}

// serverProcess is an upload service running in a child process.
type serverProcess struct {
	Addr string
	cmd  *exec.Cmd
	stop io.Closer
}

// startServerProcess runs TestHelperUploadServer against the allocator at
// allocatorAddr and waits for its address.
func startServerProcess(tb testing.TB, allocatorAddr string) *serverProcess {
	tb.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperUploadServer$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperAllocatorEnv+"="+allocatorAddr)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	p := &serverProcess{cmd: cmd, stop: stdin}
	tb.Cleanup(func() { _ = p.stop.Close(); _ = cmd.Wait() })
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "ADDR "); ok {
				addr <- a
			}
		}
	}()
	select {
	case p.Addr = <-addr:
	case <-time.After(time.Minute):
		tb.Fatal("the upload service process did not start within a minute")
	}
	return p
}

// statusKB reads a "VmRSS"-style field of the process's /proc status.
func (p *serverProcess) statusKB(tb testing.TB, field string) uint64 {
	tb.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		tb.Fatalf("read the upload process's status: %v", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseUint(strings.Fields(v)[0], 10, 64)
			if err != nil {
				tb.Fatal(err)
			}
			return n
		}
	}
	tb.Fatalf("no %s in the upload process's status", field)
	return 0
}

// peakRSS runs fn and returns how far the process's resident set rose
// above where it was before, at its highest: the kernel's high-water mark,
// reset first (clear_refs 5).
func (p *serverProcess) peakRSS(tb testing.TB, fn func(context.Context) error) (uint64, error) {
	tb.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", p.cmd.Process.Pid), []byte("5"), 0); err != nil {
		tb.Fatalf("reset the upload process's peak RSS: %v", err)
	}
	base := p.statusKB(tb, "VmRSS")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := fn(ctx)
	return (p.statusKB(tb, "VmHWM") - base) << 10, err
}
