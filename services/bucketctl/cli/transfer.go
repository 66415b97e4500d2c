package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
)

func newUploadCmd(g *globals) *cobra.Command {
	var (
		key, contentType, affinity, idem string
		quiet                            bool
	)
	cmd := &cobra.Command{
		Use:   "upload FILE...",
		Short: "Upload files (\"-\" reads standard input); prints one JSON result per file",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if key != "" && len(args) > 1 {
				return fmt.Errorf("--key names one object; give one file")
			}
			if idem != "" && len(args) > 1 {
				// Under one key, every file after the first would be
				// refused as another object reusing it.
				return fmt.Errorf("--idempotency-key names one upload; give one file")
			}
			if n := countOf(args, "-"); n > 1 {
				return fmt.Errorf("\"-\" (standard input) is given %d times; it can be read once", n)
			}
			ctx, client, done, err := g.uploadClient(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			enc := json.NewEncoder(g.out)
			enc.SetIndent("", "  ")
			one := func(arg string) error {
				// path is the file read; arg, what messages name.
				path, name := arg, filepath.Base(arg)
				var pipe io.Reader
				if arg == "-" {
					pipe, name = cmd.InOrStdin(), "stdin"
				} else if st, err := os.Stat(arg); err == nil && !st.Mode().IsRegular() && !st.IsDir() {
					// A named pipe, <(cmd), /dev/stdin: no size ahead, no
					// second read.
					f, err := os.Open(arg)
					if err != nil {
						return err
					}
					defer f.Close()
					pipe = f
				}
				if pipe != nil {
					// An upload declares its size and sha256 first, which a
					// pipe cannot tell ahead: it is read into a temporary
					// file, which then goes like any other.
					tmp, err := spool(ctx, pipe)
					if err != nil {
						return err
					}
					defer os.Remove(tmp)
					path = tmp
				}
				ct := contentType
				if ct == "" {
					ct, err = guessContentType(path)
					if err != nil {
						return err
					}
				}
				st, err := os.Stat(path)
				if err != nil {
					return err
				}
				bar := newBar(st.Size(), name, g.errOut, quiet)
				hdr := &uploadv1.UploadHeader{
					Key: key, NameHint: name, ContentType: ct,
					AffinityKey: affinity, IdempotencyKey: idem,
				}
				resp, err := uploadclient.UploadFile(ctx, client, path, hdr, uploadclient.Options{
					Progress: func(n int64) { _ = bar.Set64(n) },
					OnRetry: func(attempt int, err error, wait time.Duration) {
						// The next attempt sends the file from its start.
						bar.Reset()
						fmt.Fprintf(g.errOut, "\nupload %s: attempt %d: %s; retrying in %v\n", arg, attempt, status.Convert(err).Message(), wait.Round(time.Millisecond))
					},
				})
				endBar(bar, err)
				if err != nil {
					var ue *uploadclient.UploadError
					if errors.As(err, &ue) && ue.IdempotencyKey != "" && idem == "" {
						return fmt.Errorf("upload %s: %s\nto upload it again without storing it twice, add --idempotency-key %s", arg, ue.Summary(), ue.IdempotencyKey)
					}
					if contentType == "" && refusedField(err, "header.content_type") {
						return fmt.Errorf("upload %s: %w\nbucketctl took %s from the file; pass --content-type with a type the service allows", arg, err, ct)
					}
					return fmt.Errorf("upload %s: %w", arg, err)
				}
				if err := enc.Encode(resultJSON(arg, resp)); err != nil {
					return err
				}
				return nil
			}
			// Every file is tried, whatever happened to the ones before.
			failed := 0
			for _, arg := range args {
				err := one(arg)
				if err == nil {
					continue
				}
				if len(args) == 1 {
					return err
				}
				failed++
				fmt.Fprintf(g.errOut, "%v\n", err)
			}
			if failed > 0 {
				return fmt.Errorf("%d of %d uploads failed", failed, len(args))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&key, "key", "", "object key (default: generated from the file name)")
	f.StringVar(&contentType, "content-type", "", "content type (default: from extension, else sniffed)")
	f.StringVar(&affinity, "affinity", "", "affinity key: equal keys land on the same bucket")
	f.StringVar(&idem, "idempotency-key", "", "retry-safe key: a repeat returns the first result")
	f.BoolVarP(&quiet, "quiet", "q", false, "no progress bar")
	return cmd
}

// endBar closes a progress bar: full after a transfer that succeeded, as
// far as it got after one that failed.
func endBar(bar *progressbar.ProgressBar, err error) {
	if err != nil {
		_ = bar.Exit()
		return
	}
	_ = bar.Finish()
}

// outputMode is the mode for a download written to path: an existing
// file's, else what a new file gets with the usual umask (0644).
func outputMode(path string) os.FileMode {
	if st, err := os.Stat(path); err == nil {
		return st.Mode().Perm()
	}
	return 0o644
}

func countOf(args []string, s string) int {
	n := 0
	for _, a := range args {
		if a == s {
			n++
		}
	}
	return n
}

// spool copies r into a new temporary file and returns its path. It
// gives up when ctx ends (Ctrl-C), even while a read of r blocks (a
// terminal, a pipe whose writer waits); that read is left behind, as the
// process is about to end.
func spool(ctx context.Context, r io.Reader) (string, error) {
	f, err := os.CreateTemp("", "bucketctl-stdin-")
	if err != nil {
		return "", fmt.Errorf("spool the input: %w", err)
	}
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(f, r)
		copied <- err
	}()
	select {
	case err = <-copied:
	case <-ctx.Done():
		err = ctx.Err()
		// The copy may still write to f: it is closed and removed, and
		// its writes fail.
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return "", fmt.Errorf("spool the input: %w", err)
	}
	return f.Name(), nil
}

// resultJSON is one upload's result; file is the argument it came from
// ("-" for standard input), so a script can match results to files.
func resultJSON(file string, r *uploadv1.UploadResponse) map[string]any {
	return map[string]any{
		"file": file, "bucket_id": r.GetBucketId(), "bucket_name": r.GetBucketName(), "key": r.GetKey(),
		"size": r.GetSize(), "sha256": r.GetSha256(), "etag": r.GetEtag(),
		"public_url": r.GetPublicUrl(), "replayed": r.GetReplayed(),
	}
}

// refusedField reports a refusal of the request's field (a BadRequest
// field violation).
func refusedField(err error, field string) bool {
	st, ok := status.FromError(err)
	if !ok {
		return false
	}
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				if v.GetField() == field {
					return true
				}
			}
		}
	}
	return false
}

func guessContentType(path string) (string, error) {
	if ct := mime.TypeByExtension(filepath.Ext(path)); ct != "" {
		return ct, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, 512)
	n, err := io.ReadFull(f, head)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return "", err
	}
	return http.DetectContentType(head[:n]), nil
}

func newBar(size int64, label string, w io.Writer, quiet bool) *progressbar.ProgressBar {
	if quiet || !terminal(w) {
		// Redrawn ten times a second, a bar fills a log file or a CI log
		// with carriage returns.
		return progressbar.DefaultBytesSilent(size, label)
	}
	return progressbar.NewOptions64(size,
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetDescription(label),
		progressbar.OptionShowBytes(true),
		progressbar.OptionShowTotalBytes(true),
		progressbar.OptionThrottle(100_000_000),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(w) }),
		progressbar.OptionFullWidth(),
	)
}

// linkTarget follows path's symbolic links, even to a target that does
// not exist yet (which a download then makes, as a shell's "> link"
// would).
func linkTarget(path string) (string, error) {
	for range 40 {
		fi, err := os.Lstat(path)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			return path, nil
		}
		to, err := os.Readlink(path)
		if err != nil {
			return "", err
		}
		if !filepath.IsAbs(to) {
			to = filepath.Join(filepath.Dir(path), to)
		}
		path = to
	}
	return "", fmt.Errorf("%s: too many levels of symbolic links", path)
}

// terminal reports whether w is a terminal.
func terminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func newGetCmd(g *globals) *cobra.Command {
	var (
		output        string
		offset, limit int64
		quiet         bool
	)
	cmd := &cobra.Command{
		Use:   "get BUCKET_ID KEY",
		Short: "Download an object (to stdout, or -o FILE)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, client, done, err := g.uploadClient(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			var w io.Writer = g.out
			var file *os.File
			dest, inPlace := output, false
			switch output {
			case "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1":
				// Opened again, standard output redirected to a file would
				// be replaced, or written from its start.
				output = "-"
			case "/dev/stderr", "/dev/fd/2", "/proc/self/fd/2":
				output, w = "-", g.errOut
			}
			if output != "" && output != "-" {
				// Through symbolic links, the download goes to their
				// target, made if it does not exist yet.
				if dest, err = linkTarget(output); err != nil {
					return err
				}
				st, err := os.Stat(dest)
				switch {
				case err == nil && st.IsDir():
					return fmt.Errorf("-o %s is a directory; name a file", output)
				case err == nil && !st.Mode().IsRegular():
					// A device or a pipe (-o /dev/null) is written to,
					// never replaced.
					file, err = os.OpenFile(dest, os.O_WRONLY, 0)
					inPlace = true
				default:
					// Write to a temporary file and rename, so a failed
					// download never leaves a truncated file under the name.
					file, err = os.CreateTemp(filepath.Dir(dest), ".bucketctl-get-*")
					if err == nil {
						defer os.Remove(file.Name())
					}
				}
				if err != nil {
					// In the user's terms: the temporary file's name
					// would only puzzle.
					var pe *os.PathError
					if errors.As(err, &pe) {
						err = pe.Err
					}
					return fmt.Errorf("cannot write -o %s: %w", output, err)
				}
				defer file.Close()
				w = file
			}
			var bar *progressbar.ProgressBar
			progress := func(n int64) {
				if bar != nil {
					_ = bar.Set64(n)
				}
			}
			if file != nil && !quiet {
				bar = newBar(-1, args[1], g.errOut, false)
			}
			info, err := uploadclient.Get(ctx, client,
				&uploadv1.GetObjectRequest{BucketId: args[0], Key: args[1], Offset: offset, Length: limit}, w, progress)
			if bar != nil {
				endBar(bar, err)
			}
			if err != nil {
				return fmt.Errorf("get %s/%s: %w", args[0], args[1], err)
			}
			if file != nil {
				if !inPlace {
					// CreateTemp made the file private (0600); the
					// download gets the mode a file written in place
					// would have.
					if err := file.Chmod(outputMode(dest)); err != nil {
						return err
					}
				}
				if err := file.Close(); err != nil {
					return err
				}
				if !inPlace {
					if err := os.Rename(file.Name(), dest); err != nil {
						return err
					}
				}
				fmt.Fprintf(g.errOut, "wrote %d bytes (%s) to %s\n", info.GetContentLength(), info.GetContentType(), output)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&output, "output", "o", "", "write to FILE instead of stdout")
	f.Int64Var(&offset, "offset", 0, "first byte to read")
	f.Int64Var(&limit, "length", 0, "bytes to read (0 = to the end)")
	f.BoolVarP(&quiet, "quiet", "q", false, "no progress bar")
	return cmd
}

func newDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "delete BUCKET_ID KEY",
		Short: "Delete an object",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, client, done, err := g.uploadClient(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			_, err = client.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: args[0], Key: args[1]})
			if err != nil {
				return fmt.Errorf("delete %s/%s: %w", args[0], args[1], err)
			}
			fmt.Fprintf(g.out, "deleted %s/%s\n", args[0], args[1])
			return nil
		},
	}
}
