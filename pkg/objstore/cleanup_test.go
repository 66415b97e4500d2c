package objstore_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// DeleteIf removes an object only when match accepts what a HEAD shows;
// user metadata written with one PUT or a multipart upload comes back in
// the HEAD, which is what the upload service matches on.
func TestDeleteIf(t *testing.T) {
	b := bucket(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	writtenBy := func(id string) func(objstore.ObjectInfo) bool {
		return func(info objstore.ObjectInfo) bool { return info.Metadata["write-id"] == id }
	}
	in := objstore.PutInput{Key: "k", ContentType: "application/octet-stream", Metadata: map[string]string{"write-id": "first"}}
	if _, err := b.Put(ctx, in, random(t, 1000)); err != nil {
		t.Fatal(err)
	}
	if deleted, err := b.DeleteIf(ctx, "k", writtenBy("second")); err != nil || deleted {
		t.Fatalf("delete of another write's object: deleted %v, %v", deleted, err)
	}
	if _, err := b.Head(ctx, "k"); err != nil {
		t.Fatalf("the older object is gone: %v", err)
	}
	if deleted, err := b.DeleteIf(ctx, "k", writtenBy("first")); err != nil || !deleted {
		t.Fatalf("delete of the write's own object: deleted %v, %v", deleted, err)
	}
	if _, err := b.Head(ctx, "k"); !objstore.IsNotFound(err) {
		t.Fatalf("head after delete: %v", err)
	}
	if deleted, err := b.DeleteIf(ctx, "k", writtenBy("first")); err != nil || deleted {
		t.Fatalf("delete of an absent key: deleted %v, %v", deleted, err)
	}

	const part = 5 << 20
	data := random(t, part+10)
	in = objstore.PutInput{Key: "mp", ContentType: "application/octet-stream", Metadata: map[string]string{"write-id": "mp"}}
	id, err := b.CreateMultipart(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	var parts []objstore.Part
	for i, chunk := range [][]byte{data[:part], data[part:]} {
		etag, err := b.UploadPart(ctx, "mp", id, int32(i+1), chunk)
		if err != nil {
			t.Fatal(err)
		}
		parts = append(parts, objstore.Part{Number: int32(i + 1), ETag: etag})
	}
	if _, err := b.CompleteMultipart(ctx, "mp", id, parts); err != nil {
		t.Fatal(err)
	}
	if deleted, err := b.DeleteIf(ctx, "mp", writtenBy("mp")); err != nil || !deleted {
		t.Fatalf("delete of a completed multipart upload by its metadata: deleted %v, %v", deleted, err)
	}
}

// AbortUploads aborts the uploads of exactly its key, not those of keys it
// is a prefix of.
func TestAbortUploads(t *testing.T) {
	b := bucket(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, key := range []string{"a", "a", "ab", "b"} {
		if _, err := b.CreateMultipart(ctx, objstore.PutInput{Key: key, ContentType: "application/octet-stream"}); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := b.AbortUploads(ctx, "a"); err != nil || n != 2 {
		t.Fatalf("aborted %d uploads of a (%v), want 2", n, err)
	}
	if n, err := b.AbortUploads(ctx, "a"); err != nil || n != 0 {
		t.Fatalf("second pass aborted %d (%v), want 0", n, err)
	}
	for _, key := range []string{"ab", "b"} {
		if n, err := b.AbortUploads(ctx, key); err != nil || n != 1 {
			t.Fatalf("the upload of %s: aborted %d (%v), want 1 still open", key, n, err)
		}
	}
}

// Removals ride out a bucket's passing faults: each of Delete, DeleteIf,
// AbortMultipart and AbortUploads succeeds although its first requests
// fail (a 5xx, a reset, a throttle, a lost answer), where one try would
// have left the object or the parts behind. A bucket that keeps failing
// gets RemoveAttempts tries, no more.
func TestRemovalsRetryPassingFaults(t *testing.T) {
	b, proxy := newBucket(t, objstore.Options{}, true)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	put := func(key string) {
		t.Helper()
		proxy.Set(faultproxy.Pass)
		in := objstore.PutInput{Key: key, ContentType: "application/octet-stream", Metadata: map[string]string{"write-id": key}}
		if _, err := b.Put(ctx, in, random(t, 100)); err != nil {
			t.Fatal(err)
		}
	}
	gone := func(key string) {
		t.Helper()
		proxy.Set(faultproxy.Pass)
		if _, err := b.Head(ctx, key); !objstore.IsNotFound(err) {
			t.Fatalf("%s is still there (head: %v)", key, err)
		}
	}
	for _, m := range []faultproxy.Mode{faultproxy.Error5xx, faultproxy.Reset, faultproxy.Throttle, faultproxy.LoseResponse} {
		put("d")
		proxy.SetForNext("DeleteObject", m, 2)
		if err := b.Delete(ctx, "d"); err != nil {
			t.Fatalf("delete through two faults (mode %d): %v", m, err)
		}
		gone("d")

		put("di")
		proxy.SetForNext("DeleteObject", m, 2)
		deleted, err := b.DeleteIf(ctx, "di", func(info objstore.ObjectInfo) bool { return info.Metadata["write-id"] == "di" })
		if err != nil || !deleted {
			t.Fatalf("delete-if through two faults (mode %d): deleted %v, %v", m, deleted, err)
		}
		gone("di")

		proxy.Set(faultproxy.Pass)
		id, err := b.CreateMultipart(ctx, objstore.PutInput{Key: "mp", ContentType: "application/octet-stream"})
		if err != nil {
			t.Fatal(err)
		}
		proxy.SetForNext("AbortMultipartUpload", m, 2)
		if err := b.AbortMultipart(ctx, "mp", id); err != nil {
			t.Fatalf("abort through two faults (mode %d): %v", m, err)
		}
		proxy.Set(faultproxy.Pass)
		if _, err := b.CreateMultipart(ctx, objstore.PutInput{Key: "mp", ContentType: "application/octet-stream"}); err != nil {
			t.Fatal(err)
		}
		proxy.SetForNext("ListMultipartUploads", m, 2)
		if n, err := b.AbortUploads(ctx, "mp"); err != nil || n != 1 {
			t.Fatalf("abort-by-key through two faults (mode %d): aborted %d, %v", m, n, err)
		}
		proxy.Set(faultproxy.Pass)
		if n, err := b.AbortUploads(ctx, "mp"); err != nil || n != 0 {
			t.Fatalf("uploads of mp left open: %d (%v)", n, err)
		}
	}

	put("stuck")
	// Throttled: the SDK does not retry a 429 itself, so every request
	// counted below is a try of the removal's own.
	proxy.SetFor("DeleteObject", faultproxy.Throttle)
	proxy.Counts() // reset
	if err := b.Delete(ctx, "stuck"); err == nil {
		t.Fatal("a delete the bucket always throttles succeeded")
	}
	if n := proxy.Counts()["DeleteObject"]; n != objstore.RemoveAttempts {
		t.Fatalf("%d delete requests to a bucket that always throttles, want %d", n, objstore.RemoveAttempts)
	}
}

// A CreateMultipartUpload whose answer is lost created an upload all the
// same. It is not tried again behind the caller's back, which would leave
// the first upload open with no one knowing its id: the caller gets the
// error, which says the upload may exist, and cleans up by key.
func TestLostCreateIsNotRetried(t *testing.T) {
	b, proxy := newBucket(t, objstore.Options{}, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	proxy.SetForNext("CreateMultipartUpload", faultproxy.LoseResponse, 1)
	_, err := b.CreateMultipart(ctx, objstore.PutInput{Key: "lost", ContentType: "application/octet-stream"})
	if err == nil || !objstore.MayHaveLanded(err) {
		t.Fatalf("create with its answer lost: %v, want an error that may have landed", err)
	}
	if n, err := b.AbortUploads(ctx, "lost"); err != nil || n != 1 {
		t.Fatalf("aborted %d uploads of the key (%v), want the 1 the lost create made", n, err)
	}
}

// A write that lands with its answer lost, and whose retry then fails with
// a 5xx, must say it may have landed: the 5xx alone says the opposite, and
// the caller would leave the first try's object behind, uncounted. Put and
// CompleteMultipart are tried once, so the caller learns of the lost
// answer and removes what it wrote.
func TestWritesReportALostAnswer(t *testing.T) {
	b, proxy := newBucket(t, objstore.Options{}, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	proxy.SetSequence("PutObject", faultproxy.LoseResponse, faultproxy.Error5xx)
	_, err := b.Put(ctx, objstore.PutInput{Key: "p", ContentType: "application/octet-stream"}, random(t, 100))
	if !objstore.MayHaveLanded(err) {
		t.Fatalf("put whose answer was lost: %v, want an error that may have landed", err)
	}

	id, parts := onePart(ctx, t, b, "c")
	proxy.SetSequence("CompleteMultipartUpload", faultproxy.LoseResponse, faultproxy.Error5xx)
	_, err = b.CompleteMultipart(ctx, "c", id, parts)
	if !objstore.MayHaveLanded(err) {
		t.Fatalf("complete whose answer was lost: %v, want an error that may have landed", err)
	}
}

// A write answered 200 whose body then breaks off (cut short, or stalled
// until the call's timeout) was applied: the status says so. It must say
// it may have landed, or the caller leaves a created upload open, or a
// completed object behind, with no one counting it. It is still the
// bucket's fault, so the caller fails over.
func TestWritesWithABrokenAnswerMayHaveLanded(t *testing.T) {
	b, proxy := newBucket(t, objstore.Options{CallTimeout: 500 * time.Millisecond}, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, mode := range []faultproxy.Mode{faultproxy.Truncate, faultproxy.StallBody} {
		proxy.SetForNext("CreateMultipartUpload", mode, 1)
		_, err := b.CreateMultipart(ctx, objstore.PutInput{Key: "c", ContentType: "application/octet-stream"})
		if !objstore.MayHaveLanded(err) || objstore.Classify(ctx, err) == objstore.NotBucketFault {
			t.Fatalf("mode %d: create whose answer broke off: %v (class %d), want a bucket fault that may have landed", mode, err, objstore.Classify(ctx, err))
		}
		id, parts := onePart(ctx, t, b, "c")
		proxy.SetForNext("CompleteMultipartUpload", mode, 1)
		_, err = b.CompleteMultipart(ctx, "c", id, parts)
		if !objstore.MayHaveLanded(err) || objstore.Classify(ctx, err) == objstore.NotBucketFault {
			t.Fatalf("mode %d: complete whose answer broke off: %v (class %d), want a bucket fault that may have landed", mode, err, objstore.Classify(ctx, err))
		}
	}
}

// An abort is checked: a part upload still in progress at the bucket may
// outlive an abort, so S3 says to list the parts afterwards and abort
// again while the upload is there. An abort answered but not applied
// stands in for that here.
func TestAbortIsCheckedAndRepeated(t *testing.T) {
	b, proxy := newBucket(t, objstore.Options{}, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id, _ := onePart(ctx, t, b, "mp")
	proxy.SetForNext("AbortMultipartUpload", faultproxy.Unapplied, 1)
	proxy.Counts() // reset
	if err := b.AbortMultipart(ctx, "mp", id); err != nil {
		t.Fatal(err)
	}
	if c := proxy.Counts(); c["AbortMultipartUpload"] != 2 || c["ListParts"] != 2 {
		t.Fatalf("requests %v, want 2 aborts, each checked with ListParts", c)
	}
	if n, err := b.AbortUploads(ctx, "mp"); err != nil || n != 0 {
		t.Fatalf("uploads of mp left open: %d (%v)", n, err)
	}
	// An upload a bucket never lets go of is reported.
	id, err := b.CreateMultipart(ctx, objstore.PutInput{Key: "stuck", ContentType: "application/octet-stream"})
	if err != nil {
		t.Fatal(err)
	}
	proxy.SetFor("AbortMultipartUpload", faultproxy.Unapplied)
	if err := b.AbortMultipart(ctx, "stuck", id); err == nil {
		t.Fatal("an abort that never takes reported success")
	}
}

// onePart starts a multipart upload of key and stores its first part
// (5 MiB, the least S3 takes for a part that is not the last).
func onePart(ctx context.Context, t *testing.T, b *objstore.Bucket, key string) (string, []objstore.Part) {
	t.Helper()
	id, err := b.CreateMultipart(ctx, objstore.PutInput{Key: key, ContentType: "application/octet-stream"})
	if err != nil {
		t.Fatal(err)
	}
	etag, err := b.UploadPart(ctx, key, id, 1, random(t, 5<<20))
	if err != nil {
		t.Fatal(err)
	}
	return id, []objstore.Part{{Number: 1, ETag: etag}}
}

// A write to a bucket no connection reaches (its endpoint refuses, as
// during an outage) sent nothing, so it did not land: the caller fails
// over without a cleanup that cannot succeed and without counting a
// leftover for every upload that tried the bucket. It is still the
// bucket's fault.
func TestWritesThatNeverConnectedDidNotLand(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := objstore.New(objstore.Options{Credentials: objstore.StaticCredentials{"R": {"key", "secret"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	b, err := s.Bucket(objstore.Target{ID: "down", Name: "down", Endpoint: closed, Region: "us-east-1", CredentialsRef: "R", PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, putErr := b.Put(ctx, objstore.PutInput{Key: "p", ContentType: "application/octet-stream"}, []byte("hello"))
	_, createErr := b.CreateMultipart(ctx, objstore.PutInput{Key: "c", ContentType: "application/octet-stream"})
	_, completeErr := b.CompleteMultipart(ctx, "c", "some-upload", nil)
	for op, err := range map[string]error{"put": putErr, "create": createErr, "complete": completeErr} {
		if err == nil {
			t.Fatalf("%s to a closed port succeeded", op)
		}
		if objstore.MayHaveLanded(err) {
			t.Errorf("%s that could not connect (%v) may have landed, want not", op, err)
		}
		if objstore.Classify(ctx, err) == objstore.NotBucketFault {
			t.Errorf("%s that could not connect (%v) is not the bucket's fault, want a bucket fault", op, err)
		}
	}
}
