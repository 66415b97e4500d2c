package uploader

import (
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// inFlight bounds the bytes one client's running uploads declare. The
// allocator reserves each declared size for as long as its upload lives,
// and a client trickling data just above MinDataRate keeps an upload alive
// for days: without this bound, a few such streams hold every bucket's
// room, and every other client gets "no bucket has room".
type inFlight struct {
	limit int64 // <= 0: no bound
	// wait is the retry delay a refusal suggests: long enough for a
	// stalled earlier attempt of the same upload (a dead connection) to be
	// dropped by the idle timeout.
	wait time.Duration
	mu   sync.Mutex
	held map[string]int64
}

func newInFlight(limit int64, wait time.Duration) *inFlight {
	return &inFlight{limit: limit, wait: wait, held: map[string]int64{}}
}

// take counts n declared bytes against client, or refuses them with
// RESOURCE_EXHAUSTED when the client's running uploads already declare
// too many (with RetryInfo), or when n alone is more than the bound (an
// operator's matter, so without); release gives them back.
func (f *inFlight) take(client string, n int64) (release func(), err error) {
	if f.limit <= 0 {
		return func() {}, nil
	}
	if n > f.limit {
		return nil, status.Errorf(codes.ResourceExhausted,
			"this upload declares %d bytes, more than the %d one client may have in flight on this replica (upload.clientInFlightBytes); an operator must raise that bound", n, f.limit)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if held := f.held[client]; held+n > f.limit {
		return nil, retryAfter(codes.ResourceExhausted, f.wait, fmt.Sprintf(
			"this client's running uploads already declare %d bytes; with this one (%d) they would exceed the %d bytes one client may have in flight on this replica (upload.clientInFlightBytes); retry when some have finished (a connection that died mid-upload holds its bytes until the service's idle timeout)",
			held, n, f.limit))
	}
	f.held[client] += n
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.held[client] -= n; f.held[client] <= 0 {
			delete(f.held, client)
		}
	}, nil
}
