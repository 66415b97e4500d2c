package uploader_test

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// pacedReader hands out at most one chunk per tick: a client on a slow
// link.
type pacedReader struct {
	r     io.Reader
	chunk int
	tick  <-chan time.Time
}

func (p *pacedReader) Read(b []byte) (int, error) {
	<-p.tick
	return p.r.Read(b[:min(len(b), p.chunk)])
}

// The object slowUpload hands out: 12 MiB in 24 reads of 512 KiB.
const slowSize, slowChunk = 12 << 20, 512 << 10

// slowUpload starts a stack whose reservations live ttl, and returns an
// object's bytes with a reader that hands them out one chunk every 3/20
// of ttl: an upload of about 3.6 TTLs, multipart with 5 MiB parts.
func slowUpload(t *testing.T, ttl time.Duration) (*stack, []byte, io.Reader) {
	t.Helper()
	st := startStackAt(t, []string{testenv.S3(t).Endpoint},
		func(c *allocator.Config) { c.ReservationTTL = ttl },
		func(c *uploader.Config) { c.PartSize = 5 << 20 })
	data := testenv.OpaqueBytes(t, slowSize)
	tick := time.NewTicker(ttl * 3 / 20)
	t.Cleanup(tick.Stop)
	return st, data, &pacedReader{r: bytes.NewReader(data), chunk: slowChunk, tick: tick.C}
}

// A multipart upload that lasts several reservation TTLs keeps its
// capacity the whole time: the upload service renews the reservation, so
// at every sample the bucket holds the object's bytes as reserved (or,
// after the commit, as used), never neither. Without renewals the
// reservation lapses after one TTL and the allocator hands its capacity
// back while the upload is still running.
func TestLongUploadKeepsItsReservation(t *testing.T) {
	const ttl = 2 * time.Second
	st, data, body := slowUpload(t, ttl)
	bucket := st.Buckets[0].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	type sample struct{ used, reserved int64 }
	// samples and sampleErr are read once sampled is closed.
	var samples []sample
	var sampleErr error
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			used, reserved, err := st.status(ctx)
			if err != nil {
				sampleErr = err
				return
			}
			samples = append(samples, sample{used[bucket], reserved[bucket]})
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	resp, err := uploadclient.Upload(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "slow.bin", ContentType: "application/octet-stream", Size: slowSize},
		body, uploadclient.Options{ChunkSize: slowChunk})
	close(stop)
	<-sampled
	if err != nil {
		t.Fatal(err)
	}
	if sampleErr != nil {
		t.Fatalf("GetStatus while uploading: %v", sampleErr)
	}
	if d := time.Since(start); d < 3*ttl {
		t.Fatalf("the upload took %s; the test needs at least 3 TTLs (%s)", d, 3*ttl)
	}
	if resp.GetSize() != int64(len(data)) || resp.GetBucketId() != bucket {
		t.Fatalf("response %v", resp)
	}
	// From the first sample that shows the reservation on, the bytes are
	// held as reserved or used at every sample.
	held := false
	for i, s := range samples {
		if s.used+s.reserved >= slowSize {
			held = true
			continue
		}
		if held {
			t.Fatalf("sample %d of %d: used %d + reserved %d < %d: the reservation lapsed during the upload", i, len(samples), s.used, s.reserved, slowSize)
		}
	}
	if !held {
		t.Fatalf("no sample showed the upload's reservation (%d samples)", len(samples))
	}
	if used, _ := st.usage(t); used[bucket] != slowSize {
		t.Fatalf("used %d, want %d", used[bucket], slowSize)
	}
}
