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

// The service refuses sizes it could not serve: an object or a part over
// S3's limits, or a largest object whose two part buffers the buffer
// budget cannot hold (at 5 TiB, parts are 525 MiB each).
func TestCheckSizes(t *testing.T) {
	for _, c := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"the defaults", Config{MaxObjectSize: 5 << 30, PartSize: 8 << 20, BufferBudget: 512 << 20}, true},
		{"5 TiB with room for two parts", Config{MaxObjectSize: 5 << 40, PartSize: 8 << 20, BufferBudget: 1100 << 20}, true},
		{"5 TiB in the default budget", Config{MaxObjectSize: 5 << 40, PartSize: 8 << 20, BufferBudget: 512 << 20}, false},
		{"an object over 5 TiB", Config{MaxObjectSize: 60 << 40, PartSize: 8 << 20, BufferBudget: 16 << 30}, false},
		{"a part over 5 GiB", Config{MaxObjectSize: 5 << 30, PartSize: 6 << 30, BufferBudget: 16 << 30}, false},
	} {
		if err := checkSizes(c.cfg); (err == nil) != c.ok {
			t.Errorf("%s: %v, want ok=%v", c.name, err, c.ok)
		}
	}
}
