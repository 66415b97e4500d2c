package objectkey_test

import (
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/objectkey"
)

func TestValidate(t *testing.T) {
	good := []string{"a", "photos/2026/cat.png", "with space/ü.txt", "a..b/c", strings.Repeat("k", 1024),
		"می\u200cخواهم.txt", "family-\U0001F468\u200d\U0001F469.png",
		"flags/\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F.png", // England
		"reports/Jahres\u00adbericht.pdf", "invoices/\u0600\u0661\u0662.pdf"}
	for _, k := range good {
		if err := objectkey.Validate(k); err != nil {
			t.Errorf("Validate(%q) = %v, want ok", k, err)
		}
	}
	bad := map[string]string{
		"empty":         "",
		"leading slash": "/etc/passwd",
		"folder":        "photos/",
		"dotdot":        "a/../b",
		"dotdot first":  "../b",
		"dot segment":   "a/./b",
		"newline":       "a\nb",
		"nul":           "a\x00b",
		"del":           "a\x7fb",
		"too long":      strings.Repeat("k", 1025),
		"bad utf8":      "a\xffb",
		"bidi override": "inv\u202egpj.exe",
		"zero width":    "a\u200bb",
		"bom":           "\ufeffa",
		"line sep":      "a\u2028b",
		"para sep":      "a\u2029b",
		"word joiner":   "a\u2060b",
		"isolate":       "a\u2067b",
	}
	for name, k := range bad {
		if err := objectkey.Validate(k); err == nil {
			t.Errorf("%s: Validate(%q) accepted", name, k)
		}
	}
	// Keys with invisible characters written before Validate refused
	// them stay readable.
	if err := objectkey.Readable("inv\u202egpj.exe"); err != nil {
		t.Errorf("Readable refused a key written under the earlier rules: %v", err)
	}
	if err := objectkey.Readable("a/../b"); err == nil {
		t.Error("Readable accepted a .. segment")
	}
}

func TestFromName(t *testing.T) {
	now := time.Date(2026, 11, 25, 0, 0, 0, 0, time.UTC)
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		k := objectkey.FromName("../../My Photo (1).PNG", now)
		if err := objectkey.Validate(k); err != nil {
			t.Fatalf("generated key %q invalid: %v", k, err)
		}
		if !strings.HasPrefix(k, "2026/11/25/") || !strings.HasSuffix(k, "-My_Photo__1_.PNG") {
			t.Fatalf("key %q lacks the date prefix or sanitized name", k)
		}
		if seen[k] {
			t.Fatalf("duplicate key %q", k)
		}
		seen[k] = true
	}
	if k := objectkey.FromName("", now); !strings.HasSuffix(k, "-object") {
		t.Fatalf("empty name gave %q", k)
	}
}

// A public URL names the key it was made from: parsed back, its path is
// base's path plus the key, whatever characters the key holds.
func TestPublicURL(t *testing.T) {
	if got := objectkey.PublicURL("", "a.png"); got != "" {
		t.Fatalf("no base: %q, want none", got)
	}
	for _, key := range []string{
		"a.png", "photos/2026/cat.png", "my cat #1?.png", "100%/a+b=c&d.png", "Café à Zürich/ü.png", "a//b.png", "semi;colon,comma.txt",
	} {
		for _, base := range []string{"https://pub.example.com", "https://pub.example.com/", "https://cdn.example.com/media"} {
			raw := objectkey.PublicURL(base, key)
			u, err := url.Parse(raw)
			if err != nil {
				t.Fatalf("%q under %q: %q does not parse: %v", key, base, raw, err)
			}
			want := strings.TrimSuffix(strings.TrimPrefix(base, "https://"+u.Host), "/") + "/" + key
			if u.Path != want || u.RawQuery != "" || u.Fragment != "" || strings.Contains(raw, "+") || strings.Contains(raw, " ") {
				t.Fatalf("%q under %q: %q has path %q (want %q), query %q, fragment %q", key, base, raw, u.Path, want, u.RawQuery, u.Fragment)
			}
		}
	}
}

// Whatever name hint a client sends, the key made from it passes Validate:
// the service never builds a key it would then refuse.
func FuzzFromName(f *testing.F) {
	for _, s := range []string{"cat.png", "", ".", "..", "../../etc/passwd", `a\b\c.txt`, "ü.png", strings.Repeat("x", 5000), "\x00\x01", "/", "a/", "\xff\xfe"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		k := objectkey.FromName(name, time.Unix(0, 0))
		if err := objectkey.Validate(k); err != nil {
			t.Fatalf("FromName(%q) = %q, which Validate refuses: %v", name, k, err)
		}
	})
}

// Every valid key's public URL parses back to exactly that key under the
// base's path, with no query or fragment.
func FuzzPublicURL(f *testing.F) {
	for _, s := range []string{"a.png", "my cat #1?.png", "100%/a+b=c&d.png", "a//b", `back\slash`, "Café/ü", "x;y,z"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		if objectkey.Validate(key) != nil {
			return
		}
		raw := objectkey.PublicURL("https://pub.example.com/media", key)
		u, err := url.Parse(raw)
		if err != nil || u.Path != "/media/"+key || u.RawQuery != "" || u.Fragment != "" {
			t.Fatalf("key %q: URL %q parses to path %q, query %q, fragment %q (err %v)", key, raw, u.Path, u.RawQuery, u.Fragment, err)
		}
	})
}
