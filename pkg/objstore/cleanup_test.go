package objstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// The ETags the store gives a PUT and a completed multipart upload are the
// ones computed from the bytes; DeleteIfETag removes an object only when
// its ETag says it holds those bytes.
func TestDeleteIfETag(t *testing.T) {
	b := bucket(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	older, newer := random(t, 1000), random(t, 1000)
	put := func(key string, data []byte) string {
		t.Helper()
		etag, err := b.Put(ctx, objstore.PutInput{Key: key, ContentType: "application/octet-stream"}, data)
		if err != nil {
			t.Fatal(err)
		}
		return etag
	}
	if etag := put("k", older); etag != `"`+objstore.ObjectETag(older)+`"` {
		t.Fatalf("PUT ETag %s, computed %s", etag, objstore.ObjectETag(older))
	}
	if deleted, err := b.DeleteIfETag(ctx, "k", objstore.ObjectETag(newer)); err != nil || deleted {
		t.Fatalf("delete with another object's ETag: deleted %v, %v", deleted, err)
	}
	if _, err := b.Head(ctx, "k"); err != nil {
		t.Fatalf("the older object is gone: %v", err)
	}
	if deleted, err := b.DeleteIfETag(ctx, "k", ""); err != nil || deleted {
		t.Fatalf("delete with no ETag: deleted %v, %v", deleted, err)
	}
	if deleted, err := b.DeleteIfETag(ctx, "k", objstore.ObjectETag(older)); err != nil || !deleted {
		t.Fatalf("delete with the object's ETag: deleted %v, %v", deleted, err)
	}
	if _, err := b.Head(ctx, "k"); !objstore.IsNotFound(err) {
		t.Fatalf("head after delete: %v", err)
	}
	if deleted, err := b.DeleteIfETag(ctx, "k", objstore.ObjectETag(older)); err != nil || deleted {
		t.Fatalf("delete of an absent key: deleted %v, %v", deleted, err)
	}

	const part = 5 << 20
	data := random(t, part+10)
	id, err := b.CreateMultipart(ctx, objstore.PutInput{Key: "mp", ContentType: "application/octet-stream"})
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
	etag, err := b.CompleteMultipart(ctx, "mp", id, parts)
	if err != nil {
		t.Fatal(err)
	}
	if want := `"` + objstore.MultipartETag(parts) + `"`; etag != want {
		t.Fatalf("multipart ETag %s, computed %s", etag, want)
	}
	if objstore.MultipartETag([]objstore.Part{{Number: 1, ETag: `"not-an-md5"`}}) != "" {
		t.Fatal("an ETag that is not an MD5 gave a multipart ETag")
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
