package uploader

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
)

// errIdle: the client sent (or read) nothing for the idle timeout.
var errIdle = errors.New("client idle")

// pacedStream runs a stream's RecvMsg (or SendMsg) calls on a goroutine of
// its own, one at a time, so that a client which stops sending (or stops
// reading) can be given up on: neither call takes a deadline, a handler
// cannot cancel its own stream, and flow control holds a Send until the
// client reads. Returning from the handler ends the stream, and with it an
// abandoned call (grpc-go#1229). Without it, a stalled client would hold
// its buffers (an upload also its renewed reservation and open multipart
// upload) for as long as its connection lives.
type pacedStream struct {
	op      func(any) error
	idle    time.Duration
	abandon string // what errIdle says; %v is the idle timeout
	ask     chan any
	got     chan error // buffered: a call that outlives its wait never blocks
	timer   *time.Timer
	broken  error
}

func newPacedStream(op func(any) error, idle time.Duration, abandon string) *pacedStream {
	p := &pacedStream{op: op, idle: idle, abandon: abandon, ask: make(chan any), got: make(chan error, 1)}
	p.timer = time.NewTimer(idle)
	p.timer.Stop()
	go func() {
		// Ends once close is called and the last call returned, which
		// the handler's return guarantees (gRPC then ends the stream).
		for m := range p.ask {
			p.got <- p.op(m)
		}
	}()
	return p
}

// newReceiver paces an Upload stream's receives. A message the codec
// could not decode is the client's fault, INVALID_ARGUMENT: gRPC itself
// would answer INTERNAL, which sends an operator looking for a bug.
func newReceiver(stream uploadv1.UploadService_UploadServer, idle time.Duration, codec *chunkCodec) *pacedStream {
	recv := func(m any) error {
		if err := stream.RecvMsg(m); err != nil {
			return err
		}
		if err := codec.undecodable(m); err != nil {
			return badRequest("a message on the stream could not be read as an UploadRequest (%v); send bucketlb.upload.v1.UploadRequest messages encoded as protobuf", err)
		}
		return nil
	}
	return newPacedStream(recv, idle, "nothing arrived from the client for %v, so the upload was abandoned and nothing was stored")
}

// oversized is the error for a chunk of size bytes, over MaxChunk, that
// passed gRPC's message limit (past it, gRPC itself answers
// RESOURCE_EXHAUSTED before the handler sees the message).
func oversized(size int) error {
	return badField("chunk", "a data chunk was larger than this service accepts (%d bytes); send the data in chunks of at most %d bytes (64 KiB to 1 MiB works best)", size, MaxChunk)
}

// do runs the call on m, or fails with errIdle when it does not return
// within the idle timeout. After that failure the stream is done (the
// abandoned call may still use m, and a receive its codec target), and
// every later call fails the same way at once.
func (p *pacedStream) do(m any) error { return p.doUntil(context.Background(), m) }

// doUntil is do that also gives up when stop ends, failing
// with its cause, the same way for good: an upload the service stopped
// (its reservation or its bucket lost) does not wait on for a client
// that is slow to send.
func (p *pacedStream) doUntil(stop context.Context, m any) error {
	if p.broken != nil {
		return p.broken
	}
	p.ask <- m
	p.timer.Reset(p.idle)
	defer p.timer.Stop()
	select {
	case err := <-p.got:
		return err
	case <-p.timer.C:
		p.broken = fmt.Errorf("%w: "+p.abandon, errIdle, p.idle)
		return p.broken
	case <-stop.Done():
		p.broken = context.Cause(stop)
		return p.broken
	}
}

// abandoned reports a call that was given up on: it may still be running,
// and owns what it was given.
func (p *pacedStream) abandoned() bool { return p.broken != nil }

// close lets the goroutine end.
func (p *pacedStream) close() { close(p.ask) }

// chunkReader reads an Upload stream's chunks as an io.Reader and enforces
// the declared size: it never hands out more than size bytes, and
// Finish checks that the client sent exactly that many.
type chunkReader struct {
	rcv     *pacedStream
	size    int64
	read    int64
	pending []byte

	// A client must send at least minBytes in each window of time the
	// service spends waiting for it: the idle timeout alone lets a client
	// that sends a byte (or an empty chunk) now and then hold its buffers,
	// reservation and multipart upload for good. Only waiting counts, so
	// a service slowed by its bucket never blames the client.
	minBytes, got int64
	window        time.Duration
	waited        time.Duration
	minRate       int64

	// msg is received into for every chunk; when the server runs with its
	// codec, target (registered for msg) lets the codec put a chunk's bytes
	// straight into the buffer Read was given.
	msg    *uploadv1.UploadRequest
	target *chunkTarget
	codec  *chunkCodec

	// stop ends a wait for the client when the upload is stopped on the
	// service's side (see pacedStream.doUntil); Background until then.
	stop context.Context
}

func (s *Server) newChunkReader(rcv *pacedStream, size int64) *chunkReader {
	r := &chunkReader{rcv: rcv, size: size, msg: &uploadv1.UploadRequest{}, codec: s.codec, target: &chunkTarget{}, stop: context.Background(),
		minRate: s.cfg.MinDataRate, window: s.cfg.IdleTimeout, minBytes: int64(float64(s.cfg.MinDataRate) * s.cfg.IdleTimeout.Seconds())}
	s.codec.targets.Store(r.msg, r.target)
	return r
}

// Close unregisters the reader from the codec.
func (r *chunkReader) Close() {
	r.codec.targets.Delete(r.msg)
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if r.read == r.size {
		return 0, io.EOF
	}
	for len(r.pending) == 0 {
		r.target.dst, r.target.hit = p, false
		err := r.recv(r.msg)
		if r.rcv.abandoned() {
			// The abandoned receive still owns the message and target.
			return 0, err
		}
		r.target.dst = nil
		if err != nil {
			return 0, r.short(err)
		}
		if r.msg.GetHeader() != nil {
			return 0, badRequest("a second header arrived after %d bytes of data; send exactly one header first", r.read)
		}
		t := r.target
		if !t.hit && r.msg.GetPayload() == nil {
			return 0, notAChunk()
		}
		size := len(r.msg.GetChunk())
		if t.hit {
			size = t.n + len(t.rest)
		}
		if size > MaxChunk {
			return 0, oversized(size)
		}
		if err := r.progress(size); err != nil {
			return 0, err
		}
		if t.hit {
			// The codec already wrote t.n bytes into p.
			r.pending, t.rest = t.rest, nil
			if t.n > 0 {
				return r.advance(t.n)
			}
			continue
		}
		r.pending = r.msg.GetChunk()
	}
	n, err := r.advance(copy(p, r.pending))
	if err != nil {
		return 0, err
	}
	r.pending = r.pending[n:]
	return n, nil
}

// notAChunk refuses a message after the header that holds neither a
// header nor a chunk: an empty one, or one of a kind this server does not
// know (a newer client's), whose meaning it would otherwise drop unseen.
func notAChunk() error {
	return badRequest("a message after the header carried no chunk of data (it was empty, or of a kind this server does not know); every message after the header must carry a chunk")
}

// advance counts n bytes handed out, refusing any beyond the declared size.
func (r *chunkReader) advance(n int) (int, error) {
	if left := r.size - r.read; int64(n) > left {
		return 0, badField("header.size", "the stream carries more than the %d bytes the header declared", r.size)
	}
	r.read += int64(n)
	return n, nil
}

// Finish returns an error unless the stream ends right after size bytes.
func (r *chunkReader) Finish() error {
	if len(r.pending) > 0 {
		return badField("header.size", "the stream carries more than the %d bytes the header declared", r.size)
	}
	msg := r.msg // its target is empty now: the codec decodes it whole
	for {
		err := r.recv(msg)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if msg.GetHeader() != nil {
			return badRequest("a second header arrived after the data; send exactly one header first")
		}
		if msg.GetPayload() == nil {
			return notAChunk()
		}
		if len(msg.GetChunk()) > 0 {
			return badField("header.size", "the stream carries more than the %d bytes the header declared", r.size)
		}
		if err := r.progress(0); err != nil {
			return err
		}
	}
}

// recv receives the next message, counting the time spent waiting for it.
func (r *chunkReader) recv(m *uploadv1.UploadRequest) error {
	t0 := time.Now()
	err := r.rcv.doUntil(r.stop, m)
	r.waited += time.Since(t0)
	return err
}

// progress counts n bytes received and fails once a whole window of
// waiting brought fewer than minBytes.
func (r *chunkReader) progress(n int) error {
	r.got += int64(n)
	if r.minBytes <= 0 || r.waited < r.window {
		return nil
	}
	if r.got < r.minBytes {
		return fmt.Errorf("%w: the client sent %d bytes in the last %v the service waited for data, under the minimum of %d bytes a second, so the upload was abandoned and nothing was stored",
			errIdle, r.got, r.waited.Round(time.Millisecond), r.minRate)
	}
	r.got, r.waited = 0, 0
	return nil
}

// fill reads exactly len(p) bytes.
func (r *chunkReader) fill(p []byte) error {
	_, err := io.ReadFull(r, p)
	return r.short(err)
}

// short turns the end of the data before the declared size into the
// client's error.
func (r *chunkReader) short(err error) error {
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return badField("header.size", "the stream ended after %d bytes but the header declared %d", r.read, r.size)
	}
	return err
}
