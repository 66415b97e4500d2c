// Package uploadclient streams files to the UploadService and reads them
// back: the client side the CLI, tests and benchmarks share.
package uploadclient

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	mrand "math/rand/v2"
	"os"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/backoff"
	"github.com/bucketlb/bucketlb/pkg/errinfo"
)

// DefaultChunkSize is the data carried per message. gRPC lets a whole
// message in past the receiver's flow-control window, so each upload
// waiting on its part buffers holds about one chunk in the server's
// transport: 64 KiB keeps that within the server's memory goal (256 KiB
// put it 0.1-0.5 MiB per upload over), at no throughput cost measured.
const DefaultChunkSize = 64 << 10

// Options tune one upload.
type Options struct {
	// ChunkSize is the bytes per message; DefaultChunkSize when zero. The
	// service refuses chunks over 1 MiB.
	ChunkSize int
	// Progress, if set, is called with the bytes sent after each chunk.
	Progress func(sent int64)
	// Retries is how often UploadFile tries again after an answer that
	// invites it: UNAVAILABLE, or any status carrying RetryInfo (a rate
	// limit, a replica whose buffers are full). 0 means 3; negative, none.
	Retries int
	// OnRetry, if set, is called before each retry with the failed
	// call's number (from 1; a refusal by the rate limit is a call too),
	// its error and the wait before the next.
	OnRetry func(attempt int, err error, wait time.Duration)
	// RateLimitWait bounds the time UploadFile waits in all for the
	// service's rate limit (RESOURCE_EXHAUSTED, reason RATE_LIMITED), which
	// refuses a call before it starts: such refusals do not count as
	// Retries. 0 means a minute; negative, no waiting.
	RateLimitWait time.Duration
}

// maxRetryWait caps a server-suggested delay.
const maxRetryWait = 30 * time.Second

// Upload sends hdr then the bytes of r. hdr.Size must be the exact length.
func Upload(ctx context.Context, c uploadv1.UploadServiceClient, hdr *uploadv1.UploadHeader, r io.Reader, opts Options) (*uploadv1.UploadResponse, error) {
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	// Ended on every return: an upload given up on (its input failed)
	// must not keep its stream, and the server its buffers, until ctx ends.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.Upload(ctx)
	if err != nil {
		return nil, fmt.Errorf("open upload stream: %w", err)
	}
	if err := stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: hdr}}); err != nil {
		return closeWith(stream, fmt.Errorf("send header: %w", err))
	}
	buf := make([]byte, chunkBuffer(opts.ChunkSize, hdr.GetSize()))
	var sent int64
	for {
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			// The message is marshalled inside Send, so buf may be reused.
			if err := stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: buf[:n]}}); err != nil {
				// Send reports io.EOF when the server already ended the
				// stream; its answer comes from CloseAndRecv.
				return closeWith(stream, fmt.Errorf("send chunk: %w", err))
			}
			sent += int64(n)
			if opts.Progress != nil {
				opts.Progress(sent)
			}
		}
		if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
			break
		}
		if rerr != nil {
			return nil, fmt.Errorf("read input: %w", rerr)
		}
	}
	return stream.CloseAndRecv()
}

// chunkBuffer sizes the read buffer: a chunk, but no larger than the
// declared object, so a 1 KiB upload does not allocate 256 KiB (at a few
// thousand small uploads a second that garbage set the pace of collection
// for the whole client). Bytes beyond the declared size still go out, in a
// further chunk, for the server to refuse.
func chunkBuffer(chunkSize int, declared int64) int {
	if declared > 0 && declared < int64(chunkSize) {
		return int(declared)
	}
	return chunkSize
}

// closeWith collects the server's answer after a failed Send. The server
// may have answered early on purpose (a replayed idempotency key needs no
// data), so a response wins; else its status explains more than sendErr.
func closeWith(stream uploadv1.UploadService_UploadClient, sendErr error) (*uploadv1.UploadResponse, error) {
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	if resp != nil {
		return resp, nil
	}
	return nil, sendErr
}

// UploadFile uploads a file. The header's size is filled from the file and,
// unless the caller set one, its sha256 from a first read pass, so the
// server verifies the bytes end to end. Answers that invite it are retried
// from the file's start (Options.Retries) under an idempotency key, made up
// when the caller gave none, so the file is stored and counted once.
func UploadFile(ctx context.Context, c uploadv1.UploadServiceClient, path string, hdr *uploadv1.UploadHeader, opts Options) (*uploadv1.UploadResponse, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	hdr = proto.Clone(hdr).(*uploadv1.UploadHeader)
	hdr.Size = st.Size()
	if hdr.Sha256 == "" {
		h := sha256.New()
		if _, err := io.Copy(h, ctxReader{ctx, f}); err != nil {
			return nil, fmt.Errorf("hash %s: %w", path, err)
		}
		hdr.Sha256 = hex.EncodeToString(h.Sum(nil))
	}
	retries := opts.Retries
	if retries == 0 {
		retries = 3
	}
	if retries > 0 && hdr.IdempotencyKey == "" {
		// A retry after a lost answer must not store the file twice.
		hdr.IdempotencyKey = "uploadfile-" + rand.Text()
	}
	limitWait := opts.RateLimitWait
	if limitWait == 0 {
		limitWait = time.Minute
	}
	var first error
	var limited time.Duration // waited for the rate limit so far
	failures := 0             // attempts that failed, not counting rate-limit refusals
	for call := 1; ; call++ {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return nil, err
		}
		resp, err := Upload(ctx, c, hdr, f, opts)
		if err == nil {
			return resp, nil
		}
		if first == nil {
			first = err
		}
		fail := func(last error) (*uploadv1.UploadResponse, error) {
			return nil, &UploadError{IdempotencyKey: hdr.GetIdempotencyKey(), Attempts: call, First: first, Last: last}
		}
		wait, ok := retryAfter(err, failures+1)
		if ok && rateLimited(err) && limitWait < 0 {
			return fail(err) // no waiting for the rate limit
		}
		if ok && rateLimited(err) && limited+wait <= limitWait {
			// Refused before it began: waiting for a token does not use
			// up a retry.
			limited += wait
		} else {
			failures++
			if !ok && call == 1 && ctx.Err() == nil {
				return nil, err // the request itself was refused: nothing to retry
			}
			// Ended by ctx (an interrupt, a deadline), the attempt may have
			// sent every byte, and the service then stores and counts the
			// object all the same: the caller needs the key to learn of it.
			if !ok || failures > retries {
				return fail(err)
			}
		}
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
			return fail(fmt.Errorf("%w (not retried: the wait of %v asked for runs past the deadline)", err, wait.Round(time.Millisecond)))
		}
		if opts.OnRetry != nil {
			opts.OnRetry(call, err, wait)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fail(fmt.Errorf("%w (while waiting to retry after: %v)", ctx.Err(), err))
		case <-t.C:
		}
	}
}

// ctxReader stops a long local read (hashing a large file) once ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// UploadError is how UploadFile fails after trying more than once, after
// an answer that invited a retry, or when ctx ended an attempt. An attempt
// may have stored the object although a later one failed (its Commit applied, its answer
// lost, then the allocator out of reach): another upload under
// IdempotencyKey, made up when the caller gave none, gets that result
// instead of storing the file a second time.
type UploadError struct {
	IdempotencyKey string
	Attempts       int
	First, Last    error
}

func (e *UploadError) Error() string {
	msg := e.Summary()
	if e.IdempotencyKey != "" {
		msg += fmt.Sprintf(" (upload again with idempotency key %q: if an attempt stored the object, that returns it rather than storing the file twice)", e.IdempotencyKey)
	}
	return msg
}

// Summary is Error without the advice on IdempotencyKey, for a caller
// that words it its own way.
func (e *UploadError) Summary() string {
	msg := fmt.Sprintf("%d attempt(s) failed, the last with: %v", e.Attempts, e.Last)
	if e.Attempts > 1 && e.First.Error() != e.Last.Error() {
		msg += fmt.Sprintf("; the first with: %v", e.First)
	}
	return msg
}

// Unwrap gives the last attempt's error, whose status is the call's.
func (e *UploadError) Unwrap() error { return e.Last }

// retryAfter says whether err invites a retry, and after how long: the
// server's RetryInfo when it sent one, plus up to half again at random
// (callers refused at one moment are all told the same delay, and would
// all come back at once), else an exponential backoff with jitter.
func retryAfter(err error, attempt int) (time.Duration, bool) {
	st, _ := status.FromError(err)
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			d := max(0, min(ri.GetRetryDelay().AsDuration(), maxRetryWait))
			return d + mrand.N(d/2+1), true
		}
	}
	if st.Code() != codes.Unavailable || refusedAtHandshake(st) {
		return 0, false
	}
	return backoff.Delay(250*time.Millisecond, attempt-1), true
}

// refusedAtHandshake reports a connection that TLS turned away: a
// certificate that did not verify (a CA that did not sign the server's),
// the other side's alert (a server that wants a client certificate), or
// a server that does not speak TLS at all.
// grpc-go calls it UNAVAILABLE, but no retry gets past it until the
// configuration changes. Its words are the only sign. A handshake cut off
// (EOF, a reset, a timeout: a replica stopping) is a passing fault and is
// retried.
func refusedAtHandshake(st *status.Status) bool {
	msg := st.Message()
	for _, sign := range []string{"x509: ", "tls: failed to verify", "remote error: tls: ", "tls: first record does not look like a TLS handshake"} {
		if strings.Contains(msg, sign) {
			return true
		}
	}
	return false
}

// rateLimited reports a refusal by the service's rate limit.
func rateLimited(err error) bool {
	return status.Code(err) == codes.ResourceExhausted && errinfo.Has(err, errinfo.RateLimited)
}

// ErrChecksumMismatch: the bytes of a whole object read back do not hash
// to the sha256 it was stored with.
var ErrChecksumMismatch = errors.New("uploadclient: the object's bytes do not match its sha256")

// Get streams an object into w and returns its info. It verifies that the
// number of bytes received matches what the server announced and, when it
// reads a whole object stored with a sha256, that the bytes hash to it
// (ErrChecksumMismatch, which also wraps the server's DATA_LOSS when the
// server's own check finds the mismatch first); w may have seen bytes by
// then, so a caller writing to a file discards it on error.
func Get(ctx context.Context, c uploadv1.UploadServiceClient, req *uploadv1.GetObjectRequest, w io.Writer, progress func(int64)) (*uploadv1.ObjectInfo, error) {
	info, err := get(ctx, c, req, w, progress)
	if status.Code(err) == codes.DataLoss {
		err = fmt.Errorf("%w: %w", ErrChecksumMismatch, err)
	}
	return info, err
}

func get(ctx context.Context, c uploadv1.UploadServiceClient, req *uploadv1.GetObjectRequest, w io.Writer, progress func(int64)) (*uploadv1.ObjectInfo, error) {
	stream, err := c.GetObject(ctx, req)
	if err != nil {
		return nil, err
	}
	first, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	info := first.GetInfo()
	if info == nil {
		return nil, errors.New("server sent data before object info")
	}
	var h hash.Hash
	if info.GetSha256() != "" && req.GetOffset() == 0 && info.GetContentLength() == info.GetSize() {
		h = sha256.New()
		w = io.MultiWriter(w, h)
	}
	var got int64
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return info, err
		}
		n, err := w.Write(msg.GetChunk())
		if err != nil {
			return info, fmt.Errorf("write output: %w", err)
		}
		got += int64(n)
		if progress != nil {
			progress(got)
		}
	}
	if got != info.GetContentLength() {
		return info, fmt.Errorf("received %d bytes, server announced %d", got, info.GetContentLength())
	}
	if h != nil {
		if sum := hex.EncodeToString(h.Sum(nil)); sum != info.GetSha256() {
			return info, fmt.Errorf("%w: %s/%s hashes to %s, stored with %s", ErrChecksumMismatch, info.GetBucketId(), info.GetKey(), sum, info.GetSha256())
		}
	}
	return info, nil
}
