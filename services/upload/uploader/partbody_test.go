package uploader

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"
)

// A reader of a part still being filled gets exactly the bytes published,
// waits for more, and ends with EOF at the part's end; after detach it gets
// an error, never the buffer (which is then reused).
func TestPartBodyReadsWhatIsFilled(t *testing.T) {
	buf := make([]byte, 10)
	copy(buf, "abcdefghij")
	p := newPartBody(buf, 3, time.Minute)
	select {
	case <-p.arrived:
	default:
		t.Fatal("a part with bytes already in it must count as arrived")
	}
	got := make(chan []byte)
	go func() {
		b, err := io.ReadAll(p)
		if err != nil {
			t.Error(err)
		}
		got <- b
	}()
	p.filledTo(7)
	p.filledTo(10)
	if b := <-got; !bytes.Equal(b, buf) {
		t.Fatalf("read %q, want %q", b, buf)
	}
	if stalled, _ := p.detach(); stalled {
		t.Fatal("detach reported a stall that did not happen")
	}
	if n, err := p.Read(make([]byte, 4)); n != 0 || !errors.Is(err, errPartDetached) {
		t.Fatalf("read after detach: %d bytes, %v", n, err)
	}
}

// A client that sends nothing for the stall time ends the read with
// errClientStalled, and detach says so; a failed fill ends it with the
// fill's error.
func TestPartBodyStallAndFail(t *testing.T) {
	p := newPartBody(make([]byte, 10), 0, 20*time.Millisecond)
	if _, err := p.Read(make([]byte, 4)); !errors.Is(err, errClientStalled) {
		t.Fatalf("read with no bytes coming: %v, want errClientStalled", err)
	}
	if stalled, waited := p.detach(); !stalled || waited < 20*time.Millisecond {
		t.Fatalf("detach after the stall: stalled %v, waited %v; want the stall and at least its 20ms", stalled, waited)
	}
	boom := errors.New("stream broke")
	p = newPartBody(make([]byte, 10), 0, time.Minute)
	done := make(chan error)
	go func() {
		_, err := p.Read(make([]byte, 4))
		done <- err
	}()
	p.fail(boom)
	if err := <-done; !errors.Is(err, boom) {
		t.Fatalf("read after a failed fill: %v, want the fill's error", err)
	}
	select {
	case <-p.arrived:
	default:
		t.Fatal("a failed fill must release a PUT waiting for the part's first bytes")
	}
}
