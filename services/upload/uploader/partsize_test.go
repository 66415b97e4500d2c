package uploader

import "testing"

// Parts are equal (R2 rejects unequal ones), at least the configured size
// (>= 5 MiB), whole MiB, and never more than 10,000 per object.
func TestPartSize(t *testing.T) {
	s := &Server{cfg: Config{PartSize: 8 << 20}}
	for _, size := range []int64{8<<20 + 1, 1 << 30, 80_000 << 20, 80_000<<20 + 1, 5 << 40} {
		p := s.partSize(size)
		parts := (size + p - 1) / p
		if p < 8<<20 || p%(1<<20) != 0 || parts > 10_000 {
			t.Fatalf("size %d: part %d bytes, %d parts", size, p, parts)
		}
		if size <= 80_000<<20 && p != 8<<20 {
			t.Fatalf("size %d: part %d, want the configured 8 MiB while it fits 10,000 parts", size, p)
		}
	}
}
