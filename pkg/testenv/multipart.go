package testenv

import (
	"context"
	"sync"

	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// DirectMultipart writes data to b the way a well-written direct SDK client
// would: parts of partSize, two in flight. Benchmarks measure uploads
// through the service against it.
func DirectMultipart(ctx context.Context, b *objstore.Bucket, key string, data []byte, partSize int) error {
	id, err := b.CreateMultipart(ctx, objstore.PutInput{Key: key, ContentType: "application/octet-stream"})
	if err != nil {
		return err
	}
	parts := make([]objstore.Part, (len(data)+partSize-1)/partSize)
	sem := make(chan struct{}, 2)
	var wg sync.WaitGroup
	var once sync.Once
	var failed error
	for i := range parts {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			etag, err := b.UploadPart(ctx, key, id, int32(i+1), data[i*partSize:min(len(data), (i+1)*partSize)])
			if err != nil {
				once.Do(func() { failed = err })
			}
			parts[i] = objstore.Part{Number: int32(i + 1), ETag: etag}
		})
	}
	wg.Wait()
	if failed != nil {
		_ = b.AbortMultipart(ctx, key, id)
		return failed
	}
	_, err = b.CompleteMultipart(ctx, key, id, parts)
	return err
}
