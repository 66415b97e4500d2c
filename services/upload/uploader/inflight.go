package uploader

import (
	"fmt"
	"sync"

	"google.golang.org/grpc/codes"
)

// inFlight bounds the bytes one client's running uploads declare. The
// allocator reserves each declared size for as long as its upload lives,
// and a client trickling data just above MinDataRate keeps an upload alive
// for days: without this bound, a few such streams hold every bucket's
// room, and every other client gets "no bucket has room".
type inFlight struct {
	limit int64 // <= 0: no bound
	mu    sync.Mutex
	held  map[string]int64
}

func newInFlight(limit int64) *inFlight { return &inFlight{limit: limit, held: map[string]int64{}} }

// take counts n declared bytes against client, or refuses them with
// RESOURCE_EXHAUSTED (and RetryInfo) when the client's running uploads
// already declare too many; release gives them back.
func (f *inFlight) take(client string, n int64) (release func(), err error) {
	if f.limit <= 0 {
		return func() {}, nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if held := f.held[client]; held+n > f.limit {
		return nil, retryLater(codes.ResourceExhausted, fmt.Sprintf(
			"this client's running uploads already declare %d bytes; with this one (%d) they would exceed the %d bytes one client may have in flight on this replica (upload.clientInFlightBytes); retry when some have finished",
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
