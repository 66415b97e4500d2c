package objstore

import "time"

// Test-only views of unexported state.

// SameClient reports whether two handles share one s3.Client.
func SameClient(a, b *Bucket) bool { return a.c == b.c }

// ClientRegion is the signing region of a handle's client.
func ClientRegion(b *Bucket) string { return b.c.Options().Region }

// RemoveAttempts is how many tries a removal gets.
const RemoveAttempts = removeAttempts

// ReadAttempts is how many GETs one read may take.
const ReadAttempts = readAttempts

// SetClock makes the store read time from now.
func SetClock(s *Store, now func() time.Time) { s.now = now }

// CachedClients is how many clients the store holds.
func CachedClients(s *Store) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.clients)
}
