package uploadclient

import "testing"

func TestChunkBuffer(t *testing.T) {
	for _, tc := range []struct {
		chunk    int
		declared int64
		want     int
	}{
		{DefaultChunkSize, 1024, 1024},
		{DefaultChunkSize, 1, 1},
		{DefaultChunkSize, DefaultChunkSize, DefaultChunkSize},
		{DefaultChunkSize, 1 << 30, DefaultChunkSize},
		{DefaultChunkSize, 0, DefaultChunkSize}, // undeclared: the server will refuse the header
		{1 << 20, 5 << 20, 1 << 20},
	} {
		if got := chunkBuffer(tc.chunk, tc.declared); got != tc.want {
			t.Errorf("chunkBuffer(%d, %d) = %d, want %d", tc.chunk, tc.declared, got, tc.want)
		}
	}
}
