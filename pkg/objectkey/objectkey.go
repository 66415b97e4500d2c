// Package objectkey validates client-chosen object keys, builds
// collision-free keys from file names, and turns keys into public URLs.
package objectkey

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"path"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// MaxLen is the S3 key limit in bytes.
const MaxLen = 1024

// Validate checks a key to write against bucketlb's rules: Readable's,
// and no invisible characters (see below).
func Validate(key string) error {
	if err := Readable(key); err != nil {
		return err
	}
	for _, r := range key {
		if invisible(r) {
			// A key holding one shows as another key (one ending ".exe"
			// as ".jpg") in logs, listings and URLs.
			return fmt.Errorf("object key contains invisible character %U (a bidi control, zero-width space, byte order mark or line separator), which would make it look like another key", r)
		}
	}
	return nil
}

// invisible reports the characters that change how a key reads without
// showing: bidi controls, zero-width spaces and word joiners, invisible
// operators, byte order marks, line and paragraph separators, and
// interlinear annotation marks. Other format characters stay allowed:
// the zero-width joiners of Persian, Indic scripts and emoji, the tags
// of flag emoji, the soft hyphen of pasted names, Arabic number signs.
func invisible(r rune) bool {
	switch {
	case r == '\u061c', r == '\u180e', r == '\u200b', r == '\u200e', r == '\u200f', r == '\ufeff',
		r == '\u2028', r == '\u2029':
		return true
	case r >= '\u202a' && r <= '\u202e', r >= '\u2060' && r <= '\u2064', r >= '\u2066' && r <= '\u2069',
		r >= '\ufff9' && r <= '\ufffb':
		return true
	}
	return false
}

// Readable checks a key to read or delete: valid UTF-8, 1–1024 bytes, no
// leading "/", no "." or ".." path segment, no control characters. Keys
// written before Validate refused invisible characters stay reachable.
func Readable(key string) error {
	switch {
	case key == "":
		return errors.New("object key is empty")
	case len(key) > MaxLen:
		return fmt.Errorf("object key is %d bytes; the limit is %d", len(key), MaxLen)
	case !utf8.ValidString(key):
		return errors.New("object key is not valid UTF-8")
	case strings.HasPrefix(key, "/"):
		return errors.New("object key must not start with \"/\"")
	case strings.HasSuffix(key, "/"):
		// S3 tools show such a key as a folder, and S3 servers over a
		// file system refuse one that holds data.
		return errors.New("object key must not end with \"/\", which names a folder")
	}
	for _, r := range key {
		if unicode.IsControl(r) {
			return fmt.Errorf("object key contains control character %U", r)
		}
	}
	for _, seg := range strings.Split(key, "/") {
		if seg == ".." || seg == "." {
			return fmt.Errorf("object key contains a %q path segment", seg)
		}
	}
	return nil
}

// FromName builds a key "<yyyy>/<mm>/<dd>/<random>-<name>" from a file
// name hint. The 128-bit random part makes keys collision-free, which R2's
// one-write-per-second-per-key limit also asks for.
func FromName(name string, now time.Time) string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%s/%s-%s", now.UTC().Format("2006/01/02"), hex.EncodeToString(b), sanitize(name))
}

// sanitize keeps the base name's letters, digits, '.', '-' and '_'.
func sanitize(name string) string {
	name = path.Base(strings.ReplaceAll(name, "\\", "/"))
	var sb strings.Builder
	for _, r := range name {
		switch {
		case r < utf8.RuneSelf && (unicode.IsLetter(r) || unicode.IsDigit(r)), r == '.', r == '-', r == '_':
			sb.WriteRune(r)
		default:
			sb.WriteByte('_')
		}
		if sb.Len() >= 128 {
			break
		}
	}
	s := strings.Trim(sb.String(), ".")
	if s == "" {
		return "object"
	}
	return s
}

// PublicURL is where a bucket published at base serves key, or "" when the
// bucket has no public URL. Each segment of the key is escaped: a key may
// hold spaces, '#', '?' or '%', which would otherwise end or change the
// URL's path, and '+', which some servers read as a space.
func PublicURL(base, key string) string {
	if base == "" {
		return ""
	}
	segs := strings.Split(key, "/")
	for i, s := range segs {
		segs[i] = strings.ReplaceAll(url.PathEscape(s), "+", "%2B")
	}
	return strings.TrimSuffix(base, "/") + "/" + strings.Join(segs, "/")
}
