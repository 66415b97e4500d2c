package objstore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// A bucket that stops sending an object midway, its connection still
// open, is given up on after ReadIdleTimeout instead of holding the read
// until the caller gives up: the read goes on from the next byte, and
// when every one of its ReadAttempts GETs stalls (each halfway through
// what was left), it fails with ErrReadStalled, a BucketTimeout. A reader
// that takes its time between reads is not cut off.
func TestGetFailsWhenTheBucketStopsSending(t *testing.T) {
	const idle = 300 * time.Millisecond
	b, proxy := newBucket(t, objstore.Options{ReadIdleTimeout: idle}, true)
	proxy.StallFor = 30 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1<<20)
	if _, err := b.Put(ctx, objstore.PutInput{Key: "obj", ContentType: "application/octet-stream"}, data); err != nil {
		t.Fatal(err)
	}

	// A slow reader: pauses of twice the idle timeout between reads.
	body, _, err := b.Get(ctx, "obj", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	buf := make([]byte, 256<<10)
	for {
		n, rerr := body.Read(buf)
		got.Write(buf[:n])
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			t.Fatalf("slow reader cut off after %d bytes: %v", got.Len(), rerr)
		}
		<-time.After(2 * idle)
	}
	body.Close()
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("slow reader got %d bytes, not the object", got.Len())
	}

	proxy.SetFor("GetObject", faultproxy.StallBody)
	body, _, err = b.Get(ctx, "obj", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	n, err := io.Copy(io.Discard, body)
	if !errors.Is(err, objstore.ErrReadStalled) || objstore.Classify(ctx, err) != objstore.BucketTimeout {
		t.Fatalf("stalled read ended after %d bytes with %v (classified %v), want ErrReadStalled, a BucketTimeout", n, err, objstore.Classify(ctx, err))
	}
	if want := int64(len(data) - len(data)>>objstore.ReadAttempts); n != want {
		t.Fatalf("stalled read gave %d bytes before failing, want %d", n, want)
	}
}
