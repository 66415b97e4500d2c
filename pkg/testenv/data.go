package testenv

import (
	"crypto/rand"
	"testing"

	"github.com/bucketlb/bucketlb/pkg/mimecheck"
)

// OpaqueBytes returns n random bytes that sniff as application/octet-stream.
// Random data sometimes starts with a known magic number (AAC's 0xFFF1, for
// one), which the upload service rightly rejects when the declared type is
// octet-stream; such draws are redrawn so tests do not flake.
func OpaqueBytes(tb testing.TB, n int) []byte {
	tb.Helper()
	sniff := mimecheck.New([]string{"application/octet-stream"})
	b := make([]byte, n)
	if n == 0 {
		return b // nothing to sniff (an empty body never passes the check)
	}
	for {
		if _, err := rand.Read(b); err != nil {
			tb.Fatal(err)
		}
		if sniff.CheckData("application/octet-stream", b[:min(n, 3072)]) == nil {
			return b
		}
	}
}
