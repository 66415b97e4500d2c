package mimecheck_test

import (
	"testing"

	"github.com/bucketlb/bucketlb/pkg/mimecheck"
)

var (
	png  = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89")
	pdf  = []byte("%PDF-1.7\n1 0 obj\n<<>>\nendobj\n")
	elf  = []byte("\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00")
	text = []byte("name,age\nann,31\nbob,42\n")
	rnd  = []byte{0x13, 0x9a, 0xff, 0x00, 0x42, 0x17, 0xc3, 0x88, 0x01, 0xfe}
)

func TestCheck(t *testing.T) {
	def := mimecheck.New(nil)
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
		{"executable as octet-stream", withBinary, "application/octet-stream", elf, false},
		{"random bytes as octet-stream when allowed", withBinary, "application/octet-stream", rnd, true},
		{"text as octet-stream", withBinary, "application/octet-stream", text, true},
		{"png as octet-stream", withBinary, "application/octet-stream", png, true},
		{"octet-stream not allowed by default", def, "application/octet-stream", rnd, false},
		{"declared type not allowed", def, "application/x-msdownload", elf, false},
		{"empty type", def, "", png, false},
		{"empty object as png", def, "image/png", nil, true},
		{"empty object as a type not allowed", def, "application/x-msdownload", nil, false},
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
