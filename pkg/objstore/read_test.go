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

// A read rides over a bucket's passing faults: a GET answered with a 5xx,
// a 429 or a reset is tried again, and a body that stalls or is cut short
// goes on from its next byte, so whole objects and ranges read back exact.
// A range the bucket ignores is not asked again, and an object replaced
// while it is read fails with ErrObjectChanged instead of joining the
// bytes of two objects.
func TestReadsRideOverPassingFaults(t *testing.T) {
	b, proxy := newBucket(t, objstore.Options{ReadIdleTimeout: 200 * time.Millisecond}, true)
	proxy.StallFor = 30 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1<<20)
	if _, err := b.Put(ctx, objstore.PutInput{Key: "obj", ContentType: "application/octet-stream"}, data); err != nil {
		t.Fatal(err)
	}
	read := func(offset, length int64) ([]byte, error) {
		body, _, err := b.Get(ctx, "obj", offset, length)
		if err != nil {
			return nil, err
		}
		defer body.Close()
		return io.ReadAll(body)
	}
	for _, m := range []faultproxy.Mode{faultproxy.Error5xx, faultproxy.Throttle, faultproxy.Reset, faultproxy.StallBody, faultproxy.Truncate} {
		for _, r := range []struct{ offset, length int64 }{{0, 0}, {1000, 300_000}} {
			want := data[r.offset:]
			if r.length > 0 {
				want = want[:r.length]
			}
			proxy.SetForNext("GetObject", m, objstore.ReadAttempts-1)
			got, err := read(r.offset, r.length)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("mode %d, range %+v, %d faults: %d bytes (equal %v), %v", m, r, objstore.ReadAttempts-1, len(got), bytes.Equal(got, want), err)
			}
		}
	}

	// Every GET cut short: the read fails, and says so.
	proxy.SetFor("GetObject", faultproxy.Truncate)
	if _, err := read(0, 0); !errors.Is(err, objstore.ErrTruncated) {
		t.Fatalf("a bucket that always cuts the body short: %v, want ErrTruncated", err)
	}
	// A bucket that keeps failing gets readAttempts GETs, no more: the
	// SDK's own retry does not multiply them. (A reset is not counted
	// here: net/http itself sends a GET again once when a kept-alive
	// connection breaks before any answer.)
	for _, m := range []faultproxy.Mode{faultproxy.Error5xx, faultproxy.Throttle} {
		proxy.Counts()
		proxy.SetFor("GetObject", m)
		if _, err := read(0, 0); err == nil {
			t.Fatalf("mode %d on every GET: the read succeeded", m)
		}
		if n := proxy.Counts()["GetObject"]; n != objstore.ReadAttempts {
			t.Fatalf("mode %d on every GET: %d GETs, want %d", m, n, objstore.ReadAttempts)
		}
	}
	proxy.Counts()
	proxy.SetFor("GetObject", faultproxy.DropContentRange)
	if _, err := read(10, 10); !errors.Is(err, objstore.ErrRangeIgnored) {
		t.Fatalf("a range answered with the whole object: %v, want ErrRangeIgnored", err)
	}
	if n := proxy.Counts()["GetObject"]; n != 1 {
		t.Fatalf("%d GETs of a range the bucket ignores, want 1", n)
	}

	// The object is replaced after the first GET stalls: the read does not
	// go on into the new object's bytes.
	proxy.SetForNext("GetObject", faultproxy.StallBody, 1)
	body, _, err := b.Get(ctx, "obj", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	if _, err := io.ReadFull(body, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	proxy.Set(faultproxy.Pass)
	if _, err := b.Put(ctx, objstore.PutInput{Key: "obj", ContentType: "application/octet-stream"}, testenv.OpaqueBytes(t, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, body); !errors.Is(err, objstore.ErrObjectChanged) {
		t.Fatalf("read on after the object was replaced: %v, want ErrObjectChanged", err)
	}
}

// An answer without a Content-Length (chunked, as a proxy on the way may
// send it) gives a range its length from its Content-Range, so a read that
// breaks off resumes within its range; a whole object's answer without
// one is refused, since whatever came would pass for the object. Before,
// the length was taken as 0: reads announced 0 bytes and sent more, and a
// resumed range read went on to the object's end.
func TestReadsWithoutAContentLength(t *testing.T) {
	b, proxy := newBucket(t, objstore.Options{}, true)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1<<20)
	if _, err := b.Put(ctx, objstore.PutInput{Key: "obj", ContentType: "application/octet-stream"}, data); err != nil {
		t.Fatal(err)
	}
	proxy.SetFor("GetObject", faultproxy.DropContentLength)
	body, info, err := b.Get(ctx, "obj", 1000, 600_000)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(body)
	body.Close()
	if err != nil || info.ContentLength != 600_000 || info.Size != int64(len(data)) || !bytes.Equal(got, data[1000:601_000]) {
		t.Fatalf("range read answered without a length: info %+v, %d bytes (%v), want 600000 of a %d-byte object", info, len(got), err, len(data))
	}
	_, _, err = b.Get(ctx, "obj", 0, 0)
	if !errors.Is(err, objstore.ErrReadNoLength) || objstore.Classify(ctx, err) == objstore.NotBucketFault {
		t.Fatalf("whole read answered without a length: %v, want ErrReadNoLength, the bucket's fault", err)
	}
}
