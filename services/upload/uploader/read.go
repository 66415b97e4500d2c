package uploader

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// getChunk is the size of the chunks GetObject sends.
const getChunk = 256 << 10

// checkedReads is how many times an object that fits in one chunk is read
// while its bytes do not match its sha256. Nothing of it has been sent
// yet, and a bit flipped on the way (plain HTTP, a proxy) is likelier
// than one at rest, so a second read usually gives the stored bytes.
const checkedReads = 2

// GetObject implements UploadService.
//
// A whole object stored with its sha256 (every upload of up to one part,
// and larger ones whose client declared it) is checked against it, so a
// bucket's wrong bytes never end a stream as if they were the object: one
// that fits in a chunk is checked before anything is sent and read again
// on a mismatch; a larger one fails DATA_LOSS in place of its last chunk,
// and the client must drop what it received. A range cannot be checked.
func (s *Server) GetObject(req *uploadv1.GetObjectRequest, stream uploadv1.UploadService_GetObjectServer) error {
	ctx := stream.Context()
	if req.GetOffset() < 0 {
		return toStatus(ctx, badField("offset", "offset must not be negative; it is %d", req.GetOffset()))
	}
	if req.GetLength() < 0 {
		return toStatus(ctx, badField("length", "length must not be negative (0 reads to the end); it is %d", req.GetLength()))
	}
	b, err := s.lookup(ctx, req.GetBucketId(), req.GetKey())
	if err != nil {
		return toStatus(ctx, err)
	}
	// A read holds its chunk buffer and the message gRPC is sending: many
	// slow readers at once would otherwise grow memory past the budget
	// that uploads keep to.
	release, err := s.buffers.acquire(ctx, 2*getChunk)
	if err != nil {
		return toStatus(ctx, err)
	}
	defer release()
	// A client that stops reading is let go after the idle timeout, like
	// one that stops sending an upload, so it cannot pin the buffers. A
	// message goes once flow control lets it, so a reader must take one
	// message's worth (getChunk) per idle timeout: 4.4 KB/s at the
	// defaults, as an upload must send upload.minDataRate.
	snd := newPacedStream(stream.SendMsg, s.cfg.IdleTimeout, fmt.Sprintf("the client took less than one message (%d KiB) in %%v, so the read was ended", getChunk>>10))
	defer snd.close()
	for try := 1; ; try++ {
		err := s.read(ctx, b, req, snd)
		var bad *mismatch
		if !errors.As(err, &bad) {
			return toStatus(ctx, err)
		}
		again := !bad.sent && try < checkedReads
		s.cfg.Metrics.RecordCorruptRead(ctx, bad.bucket)
		s.log.Error("an object's bytes do not match its sha256", "bucket", bad.bucket, "key", bad.key,
			"sha256", bad.got, "stored_sha256", bad.want, "sent", bad.sent, "reading_again", again)
		if !again {
			return toStatus(ctx, err)
		}
	}
}

// mismatch is a whole object whose bytes do not hash to its stored sha256;
// sent says whether any of them went to the client.
type mismatch struct {
	bucket, key, got, want string
	sent                   bool
}

func (m *mismatch) Error() string {
	s := fmt.Sprintf("the bytes of %s read from bucket %s hash to sha256 %s, but it was stored with %s", m.key, m.bucket, m.got, m.want)
	if m.sent {
		return s + "; discard what this read returned and read it again"
	}
	return s + "; nothing of it was sent"
}

func (m *mismatch) Is(target error) bool { return target == errCorrupt }

// read sends one read of the object: its info, then its bytes; bytes that
// do not match the stored sha256 end it with a *mismatch.
func (s *Server) read(ctx context.Context, b *objstore.Bucket, req *uploadv1.GetObjectRequest, snd *pacedStream) error {
	body, info, err := b.Get(ctx, req.GetKey(), req.GetOffset(), req.GetLength())
	if objstore.IsInvalidRange(err) {
		return fmt.Errorf("%w: offset %d is at or past the end of %s", errOutOfRange, req.GetOffset(), req.GetKey())
	}
	if err != nil {
		return s.storeErr(ctx, b, req.GetKey(), b.Missing(ctx, err), "read")
	}
	defer body.Close()
	sum := info.Metadata[sha256Key]
	for _, k := range serviceKeys { // the service's entries, not the client's
		delete(info.Metadata, k)
	}
	var h hash.Hash
	if sum != "" && req.GetOffset() == 0 && info.ContentLength == info.Size {
		h = sha256.New()
	}
	// A small object gets a buffer its own size, not a whole chunk.
	n := int64(getChunk)
	if info.ContentLength > 0 {
		n = min(n, info.ContentLength)
	}
	buf := make([]byte, n)
	sent, total := false, int64(0)
	for {
		n, rerr := io.ReadFull(body, buf)
		total += int64(n)
		// The body ends at its Content-Length (a shorter one fails with
		// objstore.ErrTruncated): knowing that, an object that fits in the
		// buffer is known whole without another read.
		end := errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) || total == info.ContentLength
		if rerr != nil && !end {
			if objstore.Classify(ctx, rerr) != objstore.NotBucketFault {
				s.logBucketFault(b, req.GetKey(), "read", rerr)
			}
			return bucketFailed(rerr, fmt.Sprintf("reading %s from bucket %s broke off: ", req.GetKey(), req.GetBucketId()), "")
		}
		if h != nil {
			_, _ = h.Write(buf[:n])
		}
		if h != nil && end {
			if got := hex.EncodeToString(h.Sum(nil)); got != sum {
				return &mismatch{bucket: b.Target.ID, key: req.GetKey(), got: got, want: sum, sent: sent}
			}
		}
		// The info goes with the first chunk, so an object that fits in
		// one is checked before the client hears of it.
		if !sent {
			if err := snd.do(&uploadv1.GetObjectResponse{Payload: &uploadv1.GetObjectResponse_Info{Info: &uploadv1.ObjectInfo{
				BucketId: req.GetBucketId(), Key: req.GetKey(), Size: info.Size, ContentType: info.ContentType,
				Etag: info.ETag, Metadata: info.Metadata, ContentLength: info.ContentLength, Sha256: sum,
			}}}); err != nil {
				return err
			}
			sent = true
		}
		if n > 0 {
			if err := snd.do(&uploadv1.GetObjectResponse{Payload: &uploadv1.GetObjectResponse_Chunk{Chunk: buf[:n]}}); err != nil {
				return err
			}
		}
		if end {
			return nil
		}
	}
}
