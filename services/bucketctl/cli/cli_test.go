package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/services/bucketctl/cli"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
)

// runAgainst runs bucketctl with args against the dev stack st, reading
// stdin, and returns what it printed to stdout and stderr.
func runAgainst(ctx context.Context, st *devstack.Stack, stdin io.Reader, args ...string) (string, string, error) {
	var out, errOut bytes.Buffer
	root := cli.NewRoot(&out, &errOut)
	root.SetIn(stdin)
	root.SetArgs(append([]string{"--upload-addr", st.UploadAddr, "--allocator-addr", st.AllocatorAddr, "--token-file", st.TokenFile}, args...))
	err := root.ExecuteContext(ctx)
	return out.String(), errOut.String(), err
}

// bucketctl's commands as an operator types them after `make run`, against
// a real dev stack: upload, get (to a file, to stdout, a range), status,
// bucket state, delete, and the errors an operator meets.
func TestCommandsAgainstTheDevStack(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	st := env.Stack
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var stdin io.Reader = strings.NewReader("")
	run := func(args ...string) (string, string, error) { return runAgainst(ctx, st, stdin, args...) }
	upload := func(path string, args ...string) map[string]any {
		t.Helper()
		out, errOut, err := run(append([]string{"upload", "-q", path}, args...)...)
		if err != nil {
			t.Fatalf("upload %s: %v (%s)", path, err, errOut)
		}
		var res map[string]any
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("upload printed %q: %v", out, err)
		}
		return res
	}

	dir := t.TempDir()
	data := e2e.RandomBytes(t, 3<<20)
	src := filepath.Join(dir, "photo.bin")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	res := upload(src)
	bucket, key := res["bucket_id"].(string), res["key"].(string)
	if bucket != "dev-hot" || res["sha256"] != e2e.HexSHA(data) || res["size"] != float64(len(data)) || !strings.HasSuffix(key, "photo.bin") {
		t.Fatalf("upload result %v", res)
	}

	back := filepath.Join(dir, "back.bin")
	if _, errOut, err := run("get", "-q", bucket, key, "-o", back); err != nil || !strings.Contains(errOut, "wrote 3145728 bytes") {
		t.Fatalf("get -o: %v (%s)", err, errOut)
	}
	if got, err := os.ReadFile(back); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("get -o wrote %d bytes (err %v), not the object", len(got), err)
	}
	// A new file gets the usual mode, not the private one of the temporary
	// file it was written as; an existing file keeps its own.
	if fi, err := os.Stat(back); err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("get -o made a file of mode %v (%v), want 0644", fi.Mode().Perm(), err)
	}
	if err := os.Chmod(back, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := run("get", "-q", bucket, key, "-o", back); err != nil {
		t.Fatalf("get -o over a file: %v (%s)", err, errOut)
	}
	if fi, err := os.Stat(back); err != nil || fi.Mode().Perm() != 0o640 {
		t.Fatalf("get -o over a file of mode 0640 left mode %v (%v)", fi.Mode().Perm(), err)
	}
	// A refused upload leaves its progress bar where it stopped, not full.
	if _, errOut, err := run("upload", src, "--content-type", "application/x-msdownload"); err == nil || strings.Contains(errOut, "100%") {
		t.Fatalf("refused upload: %v, progress shown %q; want an error and no full bar", err, errOut)
	}
	// A type bucketctl guessed, refused: the refusal lists what is
	// allowed, and bucketctl says the type was its guess.
	page := filepath.Join(dir, "page.html")
	if err := os.WriteFile(page, []byte("<html><body>hi</body></html>"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := run("upload", "-q", page); err == nil || !strings.Contains(err.Error(), "allowed are ") || !strings.Contains(err.Error(), "bucketctl took text/html") || !strings.Contains(err.Error(), "--content-type") {
		t.Fatalf("upload of a type bucketctl guessed and the service refuses: %v, want the allowed types and a hint to pass --content-type", err)
	}
	if out, _, err := run("get", bucket, key, "--offset", "10", "--length", "5"); err != nil || out != string(data[10:15]) {
		t.Fatalf("ranged get to stdout: %q, %v", out, err)
	}

	out, _, err := run("status")
	if err != nil || !strings.Contains(out, "dev-hot") || !strings.Contains(out, "3.0 MiB") || !strings.Contains(out, "TOTAL") {
		t.Fatalf("status: %v\n%s", err, out)
	}
	out, _, err = run("status", "--json")
	var status struct {
		TotalUsedBytes string `json:"totalUsedBytes"`
	}
	if err != nil || json.Unmarshal([]byte(out), &status) != nil || status.TotalUsedBytes != "3145728" {
		t.Fatalf("status --json: %v\n%s", err, out)
	}

	// "-" uploads what comes on standard input, which cannot seek.
	piped := e2e.RandomBytes(t, 100_000)
	stdin = bytes.NewReader(piped)
	if res := upload("-", "--content-type", "application/octet-stream"); res["sha256"] != e2e.HexSHA(piped) || res["size"] != float64(len(piped)) || !strings.HasSuffix(res["key"].(string), "stdin") {
		t.Fatalf("upload from standard input: %v", res)
	}

	// A put of an existing bucket changes only the fields given: a limit
	// raised keeps its priority, endpoint, region and addressing.
	before := st.Buckets[0]
	if _, errOut, err := run("buckets", "put", "--id", before.GetId(), "--monthly-limit", "20GB"); err != nil {
		t.Fatalf("buckets put of one field: %v (%s)", err, errOut)
	}
	out, errOut, err := run("buckets", "get", before.GetId())
	if err != nil {
		t.Fatalf("buckets get: %v (%s)", err, errOut)
	}
	resp := &adminv1.GetBucketResponse{}
	if err := protojson.Unmarshal([]byte(out), resp); err != nil {
		t.Fatalf("buckets get printed %q: %v", out, err)
	}
	want := proto.Clone(before).(*adminv1.BucketSpec)
	want.MonthlyLimitBytes = 20_000_000_000
	if !proto.Equal(resp.GetBucket(), want) {
		t.Fatalf("after putting a new limit alone the bucket is\n%v\nwant\n%v", resp.GetBucket(), want)
	}
	// A new bucket still needs what no default gives.
	if _, _, err := run("buckets", "put", "--id", "dev-new", "--monthly-limit", "1GB"); err == nil || !strings.Contains(err.Error(), "name") {
		t.Fatalf("new bucket without a name: %v, want an error asking for one", err)
	}

	// A draining bucket takes nothing new.
	if _, errOut, err := run("buckets", "state", "dev-hot", "draining"); err != nil {
		t.Fatalf("buckets state: %v (%s)", err, errOut)
	}
	if res := upload(src, "--key", "docs/second.bin"); res["bucket_id"] != "dev-warm" || res["key"] != "docs/second.bin" {
		t.Fatalf("upload with dev-hot draining: %v", res)
	}
	// An empty --state keeps the bucket's, as its help says.
	out, errOut, err = run("buckets", "put", "--id", "dev-hot", "--weight", "3", "--state", "")
	put := &adminv1.PutBucketResponse{}
	if err == nil {
		err = protojson.Unmarshal([]byte(out), put)
	}
	if err != nil || put.GetBucket().GetState() != adminv1.BucketState_BUCKET_STATE_DRAINING || put.GetBucket().GetWeight() != 3 {
		t.Fatalf("buckets put --weight 3 --state \"\" of a draining bucket: %v (%s%s), want it draining with weight 3", err, out, errOut)
	}

	if out, _, err := run("delete", bucket, key); err != nil || !strings.Contains(out, "deleted") {
		t.Fatalf("delete: %q, %v", out, err)
	}
	missing := filepath.Join(dir, "missing.bin")
	_, _, err = run("get", "-q", bucket, key, "-o", missing)
	if err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Fatalf("get of a deleted object: %v, want NotFound", err)
	}
	// What an operator reads: the sentence, then the code.
	if d := cli.Describe(err); !strings.HasSuffix(d, "(NotFound)") || strings.Contains(d, "rpc error") || !strings.Contains(d, "no such object") {
		t.Fatalf("get of a deleted object is told as %q, want the service's sentence followed by (NotFound)", d)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Fatalf("a failed get left %s behind (%v)", missing, err)
	}
	// Mistakes are told in the user's terms: the -o they gave, not a
	// temporary file of ours, and a flag's name once.
	noDir := filepath.Join(dir, "no-such-dir", "x.bin")
	if _, _, err := run("get", "-q", "dev-warm", "docs/second.bin", "-o", noDir); err == nil || !strings.Contains(err.Error(), "-o "+noDir) || strings.Contains(err.Error(), ".bucketctl-get") {
		t.Fatalf("get -o into a missing directory: %v, want an error naming -o %s", err, noDir)
	}
	for _, args := range [][]string{{"buckets", "put", "--id", "dev-hot", "--state", "paused"}, {"buckets", "state", "dev-hot", "paused"}} {
		if _, _, err := run(args...); err == nil || !strings.Contains(err.Error(), `"paused" is not one of active, draining, disabled`) || strings.Count(err.Error(), "state") != 1 {
			t.Fatalf("%v: %v, want the state refused, naming it once", args, err)
		}
	}

	empty := filepath.Join(dir, "empty.txt")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if res := upload(empty); res["size"] != float64(0) || res["sha256"] != e2e.HexSHA(nil) {
		t.Fatalf("upload of an empty file: %v", res)
	}

	if _, _, err := run("upload", "--key", "k", src, src); err == nil || !strings.Contains(err.Error(), "--key names one object") {
		t.Fatalf("--key with two files: %v", err)
	}
	if _, _, err := run("upload", "--idempotency-key", "k", src, src); err == nil || !strings.Contains(err.Error(), "--idempotency-key names one upload") {
		t.Fatalf("--idempotency-key with two files: %v", err)
	}
	var out2, errOut2 bytes.Buffer
	root := cli.NewRoot(&out2, &errOut2)
	root.SetArgs([]string{"--allocator-addr", st.AllocatorAddr, "--token-file", filepath.Join(dir, "no-token"), "status"})
	if err := root.ExecuteContext(ctx); err == nil || !strings.Contains(err.Error(), "no admin token") {
		t.Fatalf("status without a token: %v", err)
	}

	// BUCKETLB_ADMIN_TOKEN wins over the default token file, not over a
	// --token-file given on the command line; an empty file is no token.
	t.Setenv("BUCKETLB_ADMIN_TOKEN", "stale-token")
	statusWith := func(args ...string) error {
		root := cli.NewRoot(io.Discard, io.Discard)
		root.SetArgs(append([]string{"--allocator-addr", st.AllocatorAddr}, append(args, "status")...))
		return root.ExecuteContext(ctx)
	}
	if err := statusWith("--token-file", st.TokenFile); err != nil {
		t.Fatalf("status with --token-file and a stale BUCKETLB_ADMIN_TOKEN: %v", err)
	}
	if err := statusWith(); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("status with a stale BUCKETLB_ADMIN_TOKEN and the default file: %v, want PermissionDenied", err)
	}
	if err := statusWith("--token-file", empty); err == nil || !strings.Contains(err.Error(), "is empty") {
		t.Fatalf("status with an empty token file: %v, want it named empty", err)
	}
}

// A failed file does not stop the others: each is tried, each success
// prints its result, and the command fails naming how many did not go.
func TestUploadTriesEveryFile(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.bin")
	if err := os.WriteFile(good, e2e.RandomBytes(t, 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	root := cli.NewRoot(&out, &errOut)
	root.SetArgs([]string{"--upload-addr", env.Stack.UploadAddr, "upload", "-q", filepath.Join(dir, "missing.bin"), good})
	err := root.ExecuteContext(ctx)
	if err == nil || !strings.Contains(err.Error(), "1 of 2 uploads failed") || !strings.Contains(errOut.String(), "missing.bin") {
		t.Fatalf("upload of a missing and a good file: %v (%s), want 1 of 2 failed, naming the missing one", err, errOut.String())
	}
	if !strings.Contains(out.String(), `"sha256"`) {
		t.Fatalf("the good file after the missing one was not uploaded: %q", out.String())
	}
}

// Downloads and uploads where the paths or streams are not plain files:
// -o through a symbolic link writes its target and keeps the link; -o to
// a pipe writes into it rather than replacing it; -o to a directory fails
// before anything is read. An upload names its file in its result, draws
// no progress bar into what is not a terminal, reads standard input once,
// and stops reading it when interrupted.
func TestTransfersOnAwkwardPaths(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	st := env.Stack
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	run := func(ctx context.Context, stdin io.Reader, args ...string) (string, string, error) {
		return runAgainst(ctx, st, stdin, args...)
	}
	dir := t.TempDir()
	data := e2e.RandomBytes(t, 300_000)
	src := filepath.Join(dir, "photo.bin")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := run(ctx, nil, "upload", src) // no -q: stderr is no terminal
	if err != nil {
		t.Fatalf("upload: %v (%s)", err, errOut)
	}
	var res map[string]any
	if err := json.Unmarshal([]byte(out), &res); err != nil || res["file"] != src {
		t.Fatalf("upload printed %q (%v), want a result naming file %s", out, err, src)
	}
	if strings.ContainsAny(errOut, "\r|") {
		t.Fatalf("upload drew a progress bar into a buffer: %q", errOut)
	}
	bucket, key := res["bucket_id"].(string), res["key"].(string)

	target := filepath.Join(dir, "target.bin")
	if err := os.WriteFile(target, []byte("original"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.bin")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	// getThrough downloads to link and requires the link kept and the
	// object in target.
	getThrough := func(link, target string) {
		t.Helper()
		if _, errOut, err := run(ctx, nil, "get", "-q", bucket, key, "-o", link); err != nil {
			t.Fatalf("get -o %s: %v (%s)", link, err, errOut)
		}
		if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Fatalf("get -o replaced the link %s (%v)", link, err)
		}
		if got, err := os.ReadFile(target); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("the link's target %s holds %d bytes (%v), want the object", target, len(got), err)
		}
	}
	getThrough(link, target)

	// A link to what does not exist yet: the download makes its target.
	later := filepath.Join(dir, "later", "v2.bin")
	if err := os.Mkdir(filepath.Dir(later), 0o700); err != nil {
		t.Fatal(err)
	}
	dangling := filepath.Join(dir, "latest.bin")
	if err := os.Symlink(later, dangling); err != nil {
		t.Fatal(err)
	}
	getThrough(dangling, later)
	// -o /dev/stdout is standard output as the command has it, never a
	// file opened again (a redirected one would be replaced).
	if out, _, err := run(ctx, nil, "get", "-q", bucket, key, "-o", "/dev/stdout"); err != nil || out != string(data) {
		t.Fatalf("get -o /dev/stdout wrote %d bytes to standard output (%v), want the object", len(out), err)
	}

	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	read := make(chan []byte, 1)
	go func() {
		f, err := os.Open(fifo)
		if err != nil {
			read <- nil
			return
		}
		defer f.Close()
		b, _ := io.ReadAll(f)
		read <- b
	}()
	if _, errOut, err := run(ctx, nil, "get", "-q", bucket, key, "-o", fifo); err != nil {
		t.Fatalf("get -o a pipe: %v (%s)", err, errOut)
	}
	if got := <-read; !bytes.Equal(got, data) {
		t.Fatalf("the pipe's reader got %d bytes, want the object", len(got))
	}
	if fi, err := os.Lstat(fifo); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Fatalf("get -o replaced the pipe %s (%v)", fifo, err)
	}
	if _, _, err := run(ctx, nil, "get", "-q", bucket, key, "-o", dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Fatalf("get -o a directory: %v, want it refused as a directory", err)
	}

	// A named pipe (as <(cmd) and /dev/stdin are) is read once, like "-".
	go func() {
		f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err == nil {
			_, _ = f.Write(data)
			f.Close()
		}
	}()
	out, errOut, err = run(ctx, nil, "upload", "-q", "--content-type", "application/octet-stream", fifo)
	if err != nil || !strings.Contains(out, e2e.HexSHA(data)) {
		t.Fatalf("upload of a named pipe: %v (%s), printed %q; want the bytes written into it stored", err, errOut, out)
	}
	if _, _, err := run(ctx, strings.NewReader("x"), "upload", "-q", "-", "-"); err == nil || !strings.Contains(err.Error(), "read once") {
		t.Fatalf("upload - -: %v, want it refused", err)
	}
	// Standard input that never ends: an interrupt stops the upload.
	pr, pw := io.Pipe()
	defer pw.Close()
	interrupted, interrupt := context.WithCancel(ctx)
	go func() {
		_, _ = pw.Write([]byte("some bytes"))
		interrupt()
	}()
	done := make(chan error, 1)
	go func() {
		_, _, err := run(interrupted, pr, "upload", "-q", "--content-type", "application/octet-stream", "-")
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("interrupted upload of standard input: %v, want it cancelled", err)
		}
	case <-ctx.Done():
		t.Fatal("an interrupted upload kept reading standard input")
	}
}
