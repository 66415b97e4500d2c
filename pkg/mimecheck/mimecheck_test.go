package mimecheck_test

import (
	"archive/zip"
	"bytes"
	"strings"
	"testing"

	"github.com/bucketlb/bucketlb/pkg/mimecheck"
)

var (
	png  = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89")
	pdf  = []byte("%PDF-1.7\n1 0 obj\n<<>>\nendobj\n")
	elf  = []byte("\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00")
	text = []byte("name,age\nann,31\nbob,42\n")
	rnd  = []byte{0x13, 0x9a, 0xff, 0x00, 0x42, 0x17, 0xc3, 0x88, 0x01, 0xfe}
	jpeg = []byte("\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
)

// zipOf builds a ZIP with the named entries in order; a "*.jpeg" entry
// holds 20 KB stored as is, the rest a little XML.
func zipOf(t *testing.T, names ...string) []byte {
	t.Helper()
	var b bytes.Buffer
	w := zip.NewWriter(&b)
	for _, n := range names {
		h := &zip.FileHeader{Name: n, Method: zip.Deflate}
		data := []byte("<?xml version=\"1.0\"?><x/>")
		if bytes.HasSuffix([]byte(n), []byte(".jpeg")) {
			h.Method, data = zip.Store, bytes.Repeat([]byte{0xd8, 0x13, 0x77}, 20000/3)
		}
		f, err := w.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()[:min(b.Len(), mimecheck.SniffLen)]
}

// ftyp is the start of an ISO BMFF file (HEIC, AVIF, HEIF) with the
// given major and compatible brands.
func ftyp(major string, compatible ...string) []byte {
	body := []byte(major + "\x00\x00\x00\x00")
	for _, c := range compatible {
		body = append(body, c...)
	}
	b := []byte{0, 0, 0, byte(8 + len(body)), 'f', 't', 'y', 'p'}
	return append(append(b, body...), make([]byte, 64)...)
}

func TestCheck(t *testing.T) {
	def := mimecheck.New(nil)
	const docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
	const xlsx = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
	// Word as the detector expects it, and with a thumbnail before the
	// document part, which pushes word/ past the bytes it reads.
	word := zipOf(t, "[Content_Types].xml", "_rels/.rels", "word/document.xml")
	thumbFirst := zipOf(t, "[Content_Types].xml", "docProps/thumbnail.jpeg", "word/document.xml")
	plainZip := zipOf(t, "notes.txt", "photo.jpeg", "word/document.xml")
	withBinary := mimecheck.New(append([]string{"application/octet-stream"}, mimecheck.DefaultAllowed...))
	cases := []struct {
		name     string
		c        *mimecheck.Checker
		declared string
		data     []byte
		ok       bool
	}{
		{"png as png", def, "image/png", png, true},
		{"pdf as pdf with params", def, "application/pdf; charset=binary", pdf, true},
		{"csv sniffs as text", def, "text/csv", text, true},
		{"pdf declared as png", def, "image/png", pdf, false},
		{"random bytes as png", def, "image/png", rnd, false},
		{"svg by default (it can carry script)", def, "image/svg+xml", []byte(`<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>`), false},
		{"svg when listed", mimecheck.New([]string{"image/svg+xml"}), "image/svg+xml", []byte(`<svg xmlns="http://www.w3.org/2000/svg"><circle r="1"/></svg>`), true},
		{"executable as octet-stream", withBinary, "application/octet-stream", elf, false},
		{"random bytes as octet-stream when allowed", withBinary, "application/octet-stream", rnd, true},
		{"text as octet-stream", withBinary, "application/octet-stream", text, true},
		{"png as octet-stream", withBinary, "application/octet-stream", png, true},
		{"octet-stream not allowed by default", def, "application/octet-stream", rnd, false},
		{"declared type not allowed", def, "application/x-msdownload", elf, false},
		{"empty type", def, "", png, false},
		{"empty object as png", def, "image/png", nil, true},
		{"empty object as a type not allowed", def, "application/x-msdownload", nil, false},
		{"log with commas as text/plain", def, "text/plain", []byte("2026-01-01 12:00:00,INFO,started\n2026-01-01 12:00:01,INFO,ok\n"), true},
		{"json as text/plain", def, "text/plain", []byte("{\"a\": 1}\n"), true},
		{"readme opening with html as markdown", def, "text/markdown", []byte("<p align=\"center\">\n  <img src=\"logo.png\">\n</p>\n\n# Project\n"), true},
		{"tsv as csv", def, "text/csv", []byte("a\tb\tc\n1\t2\t3\n"), true},
		{"html as png", def, "image/png", []byte("<html><body>x</body></html>"), false},
		{"random bytes as text", def, "text/plain", rnd, false},
		{"executable as text", def, "text/plain", elf, false},
		{"jpeg as image/jpg", def, "image/jpg", jpeg, true},
		{"png as image/x-png", def, "image/x-png", png, true},
		{"pdf as image/jpg", def, "image/jpg", pdf, false},
		{"csv as application/csv", def, "application/csv", text, true},
		{"heic as heic", def, "image/heic", ftyp("heic", "mif1", "heic"), true},
		{"heic with the generic major brand as heic", def, "image/heic", ftyp("mif1", "mif1", "heic"), true},
		{"avif with the generic major brand as avif", def, "image/avif", ftyp("mif1", "avif", "mif1", "miaf"), true},
		{"heif as heif", def, "image/heif", ftyp("mif1", "mif1"), true},
		{"heif without a heic brand as heic", def, "image/heic", ftyp("mif1", "mif1"), false},
		{"heic as png", def, "image/png", ftyp("heic", "mif1", "heic"), false},
		{"docx as docx", def, docx, word, true},
		{"docx as xlsx", def, xlsx, word, false},
		{"docx with its thumbnail first as docx", def, docx, thumbFirst, true},
		{"docx with its thumbnail first as png", def, "image/png", thumbFirst, false},
		{"plain zip as docx", def, docx, plainZip, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.CheckDeclared(tc.declared)
			if err == nil {
				err = tc.c.CheckData(tc.declared, tc.data)
			}
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

// FuzzCheckData: the checker parses ZIP and ISO BMFF headers by hand; no
// bytes under any declared type make it panic, and an empty object is
// judged by its declared type alone.
func FuzzCheckData(f *testing.F) {
	f.Add("image/heic", ftyp("mif1", "heic"))
	f.Add("application/vnd.openxmlformats-officedocument.wordprocessingml.document", []byte("PK\x03\x04"+string(make([]byte, 26))))
	f.Add("text/plain", text)
	f.Add("image/png", png)
	c := mimecheck.New(nil)
	f.Fuzz(func(t *testing.T, declared string, data []byte) {
		err := c.CheckData(declared, data)
		if len(data) == 0 && err != nil {
			t.Fatalf("empty object under %q: %v", declared, err)
		}
	})
}

// Messages name the type as the client wrote it, and say when it is
// malformed rather than not allowed.
func TestMessagesNameTheDeclaredType(t *testing.T) {
	c := mimecheck.New(nil)
	for _, tc := range []struct{ declared, want string }{
		{"text/plain; charset=", "is malformed"},
		{"application/x-msdownload; x=1", `"application/x-msdownload" is not allowed`},
		// What to send instead: the allowed types, sorted, vendor types
		// last, as many as a sentence holds.
		{"text/x-log", `not allowed here; allowed are application/json, application/msword, application/pdf, image/avif, `},
		{"text/x-log", `text/plain, application/vnd.ms-excel, application/vnd.ms-powerpoint and 5 more`},
	} {
		if err := c.CheckDeclared(tc.declared); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("CheckDeclared(%q) = %v, want it to say %q", tc.declared, err, tc.want)
		}
	}
	if err := c.CheckData("image/jpg", []byte("%PDF-1.4\n")); err == nil || !strings.Contains(err.Error(), `declared content type "image/jpg"`) {
		t.Errorf("pdf declared as image/jpg: %v, want the declared name", err)
	}
}
