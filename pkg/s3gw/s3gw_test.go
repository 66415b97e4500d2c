package s3gw_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// The gateway over TLS with the SDK's default checksums (aws-chunked with a
// CRC32 trailer) must store the exact bytes: the path real R2 clients take.
func TestTLSDefaultChecksumsRoundTrip(t *testing.T) {
	g := testenv.S3TLS(t)
	bucket := testenv.NewBucket(t, g)
	c, err := g.Client()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	want := make([]byte, 1<<20+17)
	if _, err := rand.Read(want); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String("a/b.bin"), Body: bytes.NewReader(want)}); err != nil {
		t.Fatalf("put: %v", err)
	}
	out, err := c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String("a/b.bin")})
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	defer out.Body.Close()
	got, err := io.ReadAll(out.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("stored %d bytes, want %d identical bytes", len(got), len(want))
	}
}
