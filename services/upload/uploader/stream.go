package uploader

import (
	"errors"
	"io"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
)

// chunkReader reads an Upload stream's chunks as an io.Reader and enforces
// the declared size: it never hands out more than size bytes, and
// Finish checks that the client sent exactly that many.
type chunkReader struct {
	stream  uploadv1.UploadService_UploadServer
	size    int64
	read    int64
	pending []byte
	chunk   []byte // the message pending came from, released once read
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if r.read == r.size {
		return 0, io.EOF
	}
	for len(r.pending) == 0 {
		msg, err := r.stream.Recv()
		if errors.Is(err, io.EOF) {
			return 0, badRequest("the stream ended after %d bytes but the header declared %d", r.read, r.size)
		}
		if err != nil {
			return 0, err
		}
		if msg.GetHeader() != nil {
			return 0, badRequest("a second header arrived after %d bytes of data; send exactly one header first", r.read)
		}
		r.pending, r.chunk = msg.GetChunk(), msg.GetChunk()
	}
	n := copy(p, r.pending)
	if left := r.size - r.read; int64(n) > left {
		return 0, badRequest("the stream carries more than the %d bytes the header declared", r.size)
	}
	r.pending = r.pending[n:]
	r.read += int64(n)
	if len(r.pending) == 0 {
		releaseChunk(r.chunk)
		r.chunk = nil
	}
	return n, nil
}

// Finish returns an error unless the stream ends right after size bytes.
func (r *chunkReader) Finish() error {
	if len(r.pending) > 0 {
		return badRequest("the stream carries more than the %d bytes the header declared", r.size)
	}
	for {
		msg, err := r.stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if msg.GetHeader() != nil {
			return badRequest("a second header arrived after the data; send exactly one header first")
		}
		if len(msg.GetChunk()) > 0 {
			return badRequest("the stream carries more than the %d bytes the header declared", r.size)
		}
	}
}

// fill reads exactly len(p) bytes.
func (r *chunkReader) fill(p []byte) error {
	_, err := io.ReadFull(r, p)
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return badRequest("the stream ended after %d bytes but the header declared %d", r.read, r.size)
	}
	return err
}
