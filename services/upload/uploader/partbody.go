package uploader

import (
	"errors"
	"io"
	"sync"
	"time"
)

// errClientStalled ends a streamed part's PUT when the client sends
// nothing for StreamStall: the part then goes buffered once whole, and the
// bucket is not blamed for the client's pace.
var errClientStalled = errors.New("the client paused mid-part; the part is sent once whole")

// errPartDetached answers reads after the part's PUT has returned.
var errPartDetached = errors.New("part body detached")

// partBody is a part buffer that the part's PUT reads while the stream is
// still filling it. Reads wait for bytes to arrive. Reads copy under the
// lock, so once detach returns nothing reads the buffer any more and it can
// be reused, even if the HTTP transport still holds the body (it may read
// a request body after RoundTrip has returned).
type partBody struct {
	buf   []byte
	more  chan struct{} // a wake-up after each fill step
	stall time.Duration
	off   int // the reader's position; only Read touches it

	// arrived is closed once the part has bytes (or the fill failed): the
	// PUT waits for it, so a client that sends a header and then idles
	// holds no S3 request open.
	arrived     chan struct{}
	arrivedOnce sync.Once

	mu      sync.Mutex
	filled  int
	err     error
	stalled bool
	waited  time.Duration // Reads spent waiting for the client's bytes
}

func newPartBody(buf []byte, filled int, stall time.Duration) *partBody {
	p := &partBody{buf: buf, filled: filled, stall: stall, more: make(chan struct{}, 1), arrived: make(chan struct{})}
	if filled > 0 {
		p.markArrived()
	}
	return p
}

func (p *partBody) markArrived() { p.arrivedOnce.Do(func() { close(p.arrived) }) }

func (p *partBody) Read(b []byte) (int, error) {
	var timer *time.Timer
	for {
		p.mu.Lock()
		switch {
		case p.err != nil:
			err := p.err
			p.mu.Unlock()
			return 0, err
		case p.off == len(p.buf):
			p.mu.Unlock()
			return 0, io.EOF
		case p.off < p.filled:
			n := copy(b, p.buf[p.off:p.filled])
			p.off += n
			p.mu.Unlock()
			return n, nil
		}
		p.mu.Unlock()
		if timer == nil {
			timer = time.NewTimer(p.stall)
			defer timer.Stop()
		}
		t0 := time.Now()
		select {
		case <-p.more:
		case <-timer.C:
			p.mu.Lock()
			if p.err == nil {
				p.err, p.stalled = errClientStalled, true
			}
			p.mu.Unlock()
		}
		p.mu.Lock()
		p.waited += time.Since(t0)
		p.mu.Unlock()
	}
}

// filledTo publishes that buf[:n] holds the part's bytes.
func (p *partBody) filledTo(n int) {
	p.mu.Lock()
	p.filled = n
	p.mu.Unlock()
	p.markArrived()
	p.wake()
}

// fail ends reads with err (the stream broke; the upload is ending).
func (p *partBody) fail(err error) {
	p.mu.Lock()
	if p.err == nil {
		p.err = err
	}
	p.mu.Unlock()
	p.markArrived()
	p.wake()
}

// detach ends all reads; after it the buffer is the caller's again. It
// reports whether the client stalled the part, and how long the PUT
// waited for the client's bytes.
func (p *partBody) detach() (stalled bool, waited time.Duration) {
	p.fail(errPartDetached)
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stalled, p.waited
}

func (p *partBody) wake() {
	select {
	case p.more <- struct{}{}:
	default:
	}
}
