// Package mimecheck enforces the content-type allowlist against both the
// type a client declares and the type sniffed from the object's first bytes.
package mimecheck

import (
	"encoding/binary"
	"fmt"
	"maps"
	"mime"
	"slices"
	"strings"

	"github.com/gabriel-vasile/mimetype"
)

// SniffLen is how many leading bytes the detector needs at most.
const SniffLen = 3072

// DefaultAllowed are images and common documents. SVG is not among them:
// an SVG can carry script, which runs wherever its public URL is opened
// (stored XSS on that origin); list image/svg+xml to take it, from a
// public origin that serves nothing else.
var DefaultAllowed = []string{
	"image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "image/heic", "image/heif", "image/tiff", "image/bmp",
	"application/pdf", "text/plain", "text/csv", "text/markdown", "application/json",
	"application/msword", "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
	"application/vnd.ms-excel", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
	"application/vnd.ms-powerpoint", "application/vnd.openxmlformats-officedocument.presentationml.presentation",
	"application/vnd.oasis.opendocument.text", "application/vnd.oasis.opendocument.spreadsheet",
}

// generic types say nothing about the content; data that sniffs as one of
// them is accepted under any allowed, compatible declared type.
var generic = map[string]bool{"application/octet-stream": true, "text/plain": true}

// Checker holds an allowlist.
type Checker struct{ allowed map[string]bool }

// New returns a checker for the given types (DefaultAllowed when empty).
func New(allowed []string) *Checker {
	if len(allowed) == 0 {
		allowed = DefaultAllowed
	}
	m := map[string]bool{}
	for _, a := range allowed {
		m[base(a)] = true
	}
	return &Checker{allowed: m}
}

// base is a content type's media type, lower case, without parameters,
// and under its standard name when it is a common alias.
func base(ct string) string {
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		mt = strings.ToLower(strings.TrimSpace(ct))
	}
	if std, ok := aliases[mt]; ok {
		return std
	}
	return mt
}

// aliases are names clients commonly send for allowed types (image/jpg
// above all); each means its standard type, for the allowlist and the
// comparison with the sniffed type alike. The object keeps the name sent.
var aliases = map[string]string{
	"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png",
	"image/x-bmp": "image/bmp", "image/x-ms-bmp": "image/bmp",
	"application/x-pdf": "application/pdf",
	"text/x-markdown":   "text/markdown",
	"application/csv":   "text/csv", "text/comma-separated-values": "text/csv",
	"text/json": "application/json", "application/x-json": "application/json",
	"application/vnd.ms-word": "application/msword", "application/msexcel": "application/vnd.ms-excel",
	"application/mspowerpoint": "application/vnd.ms-powerpoint",
}

// CheckDeclared rejects a declared type outside the allowlist.
func (c *Checker) CheckDeclared(declared string) error {
	if declared == "" {
		return fmt.Errorf("content type is required")
	}
	if _, _, err := mime.ParseMediaType(declared); err != nil {
		return fmt.Errorf("content type %q is malformed: %v", declared, err)
	}
	if want := base(declared); !c.allowed[want] {
		return fmt.Errorf("content type %q is not allowed here; allowed are %s", mediaType(declared), c.list())
	}
	return nil
}

// list names the allowed types for a refusal, so a client learns what to
// send instead (a .log file is text/plain here, say): sorted, vendor types
// (the office formats, with long names) last, and only as many as keep
// the refusal a sentence.
func (c *Checker) list() string {
	types := slices.Sorted(maps.Keys(c.allowed))
	vendor := func(t string) int {
		if strings.Contains(t, "/vnd.") {
			return 1
		}
		return 0
	}
	slices.SortStableFunc(types, func(a, b string) int { return vendor(a) - vendor(b) })
	const room = 250
	var b strings.Builder
	for i, t := range types {
		if i > 0 && b.Len()+len(t) > room {
			fmt.Fprintf(&b, " and %d more", len(types)-i)
			break
		}
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(t)
	}
	return b.String()
}

// mediaType is a content type without its parameters, as the client wrote
// it (for messages: an alias like image/jpg is not renamed).
func mediaType(ct string) string {
	if mt, _, err := mime.ParseMediaType(ct); err == nil {
		return mt
	}
	return ct
}

// CheckData rejects data whose sniffed type contradicts the declared one
// or is itself not allowed (an executable declared as an image, say).
func (c *Checker) CheckData(declared string, head []byte) error {
	if len(head) == 0 {
		// An empty object has no bytes to contradict the declared type,
		// which CheckDeclared already held to the allowlist.
		return nil
	}
	want := base(declared)
	m := mimetype.Detect(head)
	sniffed := base(m.String())
	if sniffed == "application/zip" && ooxml[want] && ooxmlPackage(head) {
		// The detector tells DOCX, XLSX and PPTX apart by a part name
		// (word/, xl/, ppt/) within the bytes it reads; a producer that
		// puts a large part first (a thumbnail) pushes that name past
		// them. A ZIP that opens with an Office package part is such a
		// document; which of the three, the bytes at hand cannot say.
		return nil
	}
	if heifBrands[sniffed] != nil && heifBrands[want] != nil && hasBrand(head, heifBrands[want]) {
		// HEIC, AVIF and HEIF share one container, and the detector goes
		// by its major brand: a HEIC or AVIF file whose major brand is the
		// generic mif1 sniffs as HEIF. The brands the file lists say what
		// it holds.
		return nil
	}
	if isText(want) && textual(m) {
		// Text formats overlap and the detector picks one: a log with
		// commas sniffs as CSV, JSON as itself, a README that opens with
		// <p align="center"> as HTML. Under a declared text type that is
		// stored as given, what matters is that the bytes are text and
		// not a binary posing as text.
		return nil
	}
	// A declared application/octet-stream claims nothing about the
	// content, so any data the allowlist takes may carry it (a log, a
	// photo): only the sniffed type's own check below applies.
	contradicts := !m.Is(want)
	if contradicts && want != "application/octet-stream" {
		return fmt.Errorf("declared content type %q but the data looks like %q", mediaType(declared), sniffed)
	}
	if !c.allowed[sniffed] && !generic[sniffed] {
		return fmt.Errorf("the data looks like %q, which is not allowed here", sniffed)
	}
	return nil
}

// heifBrands are the ISO BMFF brands that mark each HEIF-family type.
var heifBrands = map[string][]string{
	"image/heic": {"heic", "heix", "heim", "heis"},
	"image/avif": {"avif", "avis"},
	"image/heif": {"mif1", "msf1"},
}

// hasBrand reports an ISO BMFF file whose ftyp box (first in the file)
// names one of brands as its major or a compatible brand.
func hasBrand(head []byte, brands []string) bool {
	if len(head) < 16 || string(head[4:8]) != "ftyp" {
		return false
	}
	size := min(int(binary.BigEndian.Uint32(head[:4])), len(head))
	for off := 8; off+4 <= size; off += 4 {
		if off == 12 {
			continue // the minor version, not a brand
		}
		if slices.Contains(brands, string(head[off:off+4])) {
			return true
		}
	}
	return false
}

// ooxml are the Office Open XML types, ZIP packages of XML parts.
var ooxml = map[string]bool{
	"application/vnd.openxmlformats-officedocument.wordprocessingml.document":   true,
	"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet":         true,
	"application/vnd.openxmlformats-officedocument.presentationml.presentation": true,
}

// ooxmlPackage reports a ZIP whose first entry is one of the parts an
// Office Open XML package starts with, the same first-entry rule the
// detector applies before it looks for word/, xl/ or ppt/.
func ooxmlPackage(head []byte) bool {
	// Local file header: signature, then the name's length at 26 and
	// the name itself at 30.
	if len(head) < 30 || string(head[:4]) != "PK\x03\x04" {
		return false
	}
	n := int(binary.LittleEndian.Uint16(head[26:28]))
	if len(head) < 30+n {
		return false
	}
	name := string(head[30 : 30+n])
	return name == "[Content_Types].xml" || strings.HasPrefix(name, "_rels/") || strings.HasPrefix(name, "docProps/") ||
		strings.HasPrefix(name, "customXml/")
}

// textual reports a detected type the detector files under text/plain
// (CSV, HTML, XML, JSON, scripts, ...): printable text.
func textual(m *mimetype.MIME) bool {
	for ; m != nil; m = m.Parent() {
		if m.Is("text/plain") {
			return true
		}
	}
	return false
}

// isText reports a text type, given as base returns it.
func isText(mt string) bool {
	return strings.HasPrefix(mt, "text/") || mt == "application/json"
}
