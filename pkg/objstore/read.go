package objstore

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/bucketlb/bucketlb/pkg/backoff"
)

// readAttempts bounds the GETs of one read: the first, and those that go
// on after a fault. A read cannot fail over to another bucket, so it rides
// out the brief faults (5xx, 429, resets, stalls, a body cut short) a
// bucket has now and then, and its reader sees a pause instead of an
// error.
const readAttempts = 4

// ErrObjectChanged fails a read that had to go on after a fault and found
// another object under the key (another ETag): its bytes must not be
// joined to those already read.
var ErrObjectChanged = errors.New("objstore: the object changed while it was read")

// ErrTruncated fails a read whose bucket kept ending the body before the
// bytes it announced.
var ErrTruncated = errors.New("objstore: the bucket ended the object early")

// readFault reports an error another try of the same read may not meet.
func readFault(ctx context.Context, err error) bool {
	return !errors.Is(err, ErrRangeIgnored) && Classify(ctx, err) != NotBucketFault
}

// resumingBody is a Get body that goes on after a fault: when the body
// fails or ends before its last byte, it asks the bucket for the rest of
// the range and reads on, as long as the object is the same (ETag).
type resumingBody struct {
	b         *Bucket
	ctx       context.Context
	key, etag string
	body      io.ReadCloser
	next, end int64 // next byte of the object to read; end of the range
	left      int   // GETs left
	err       error // a failure to report once the bytes before it are read
}

func (r *resumingBody) Read(p []byte) (int, error) {
	for {
		if r.err != nil {
			return 0, r.err
		}
		n, err := r.body.Read(p)
		r.next += int64(n)
		switch {
		case err == nil:
			return n, nil
		case errors.Is(err, io.EOF) && r.next >= r.end:
			return n, io.EOF
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			err = fmt.Errorf("get %s/%s: %w after %d bytes", r.b.Target.Name, r.key, ErrTruncated, r.next)
		}
		if rerr := r.resume(err); rerr != nil {
			r.err = rerr
		}
		if n > 0 {
			return n, nil
		}
	}
}

// open GETs [offset, offset+length) into r.body, spending r's GETs:
// while a GET fails for the bucket's passing fault (or the fault that
// broke the last body off, prior), it waits and tries again. It returns
// the answer's info and where its bytes start.
func (r *resumingBody) open(offset, length int64, prior error) (ObjectInfo, int64, error) {
	err := prior
	for {
		if err != nil && (r.left == 0 || r.ctx.Err() != nil || !readFault(r.ctx, err) ||
			backoff.Wait(r.ctx, retryBackoff, readAttempts-1-r.left) != nil) {
			return ObjectInfo{}, 0, err
		}
		r.left--
		body, info, start, gerr := r.b.get(r.ctx, r.key, offset, length)
		if gerr == nil {
			r.body = body
			return info, start, nil
		}
		err = gerr
	}
}

// resume reopens the rest of the range after err broke the body off, or
// returns why it cannot.
func (r *resumingBody) resume(err error) error {
	_ = r.body.Close()
	r.body = eofBody{}
	info, _, oerr := r.open(r.next, r.end-r.next, err)
	if oerr != nil {
		if oerr == err {
			return err
		}
		return fmt.Errorf("%w; going on from byte %d: %v", err, r.next, oerr)
	}
	if info.ETag != r.etag {
		_ = r.body.Close()
		r.body = eofBody{}
		return fmt.Errorf("get %s/%s: %w (ETag %s, then %s)", r.b.Target.Name, r.key, ErrObjectChanged, r.etag, info.ETag)
	}
	return nil
}

// eofBody stands in for a body that was closed.
type eofBody struct{}

func (eofBody) Read([]byte) (int, error) { return 0, io.EOF }
func (eofBody) Close() error             { return nil }

func (r *resumingBody) Close() error { return r.body.Close() }
