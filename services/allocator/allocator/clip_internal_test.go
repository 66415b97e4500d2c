package allocator

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// A reported error is logged at most maxLoggedError bytes long, cut where
// a UTF-8 character starts.
func TestClipKeepsUTF8Whole(t *testing.T) {
	long := strings.Repeat("é", maxLoggedError) // two bytes each
	got := clip(long, maxLoggedError)
	if !utf8.ValidString(got) || !strings.HasSuffix(got, "… (cut)") || len(got) > maxLoggedError+len("… (cut)") {
		t.Fatalf("clip gave %d bytes, valid UTF-8 %v", len(got), utf8.ValidString(got))
	}
	if short := "short"; clip(short, maxLoggedError) != short {
		t.Fatal("clip changed a short string")
	}
}
