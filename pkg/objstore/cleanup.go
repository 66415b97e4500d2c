package objstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/bucketlb/bucketlb/pkg/backoff"
)

// A removal is tried up to removeAttempts times, with exponential backoff
// and jitter from retryBackoff, within one CallTimeout; a try that hangs
// is given up after a third of it, so one stall does not use it all. Writes get few
// tries (see New) because the service fails over to another bucket, but
// what a removal leaves behind stays in this bucket: an object no usage
// counts, or parts the lifecycle rule removes only days later. So a
// removal rides out the brief faults (5xx, 429, resets, timeouts) a
// bucket has now and then, without holding the caller much longer than a
// call to a bucket that does not answer would.
const removeAttempts = 5

// retryBackoff is the first wait before a call to a bucket is tried again.
const retryBackoff = 50 * time.Millisecond

// removing runs op, which removes something, until it succeeds, fails
// for a reason that is not the bucket's passing fault, or runs out of
// tries or time. It runs even when ctx has ended: cleanup must not be
// skipped because the client went away.
func (b *Bucket) removing(ctx context.Context, op func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.s.opts.CallTimeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		actx, acancel := context.WithTimeout(ctx, b.s.opts.CallTimeout/3)
		err := op(actx)
		acancel()
		if err == nil || attempt == removeAttempts-1 || Classify(ctx, err) == NotBucketFault || backoff.Wait(ctx, retryBackoff, attempt) != nil {
			return err
		}
	}
}

// AbortMultipart discards an upload's parts (see removing).
func (b *Bucket) AbortMultipart(ctx context.Context, key, uploadID string) error {
	return b.removing(ctx, func(ctx context.Context) error { return b.abortMultipart(ctx, key, uploadID) })
}

// errStillOpen: an upload was still there after it was aborted.
var errStillOpen = errors.New("the multipart upload is still open after its abort")

// abortMultipart aborts an upload and checks that it is gone. A part
// upload still in progress at the bucket during the abort may yet succeed
// and keep the upload, so S3's documentation says to list the parts
// afterwards and abort again until none are left; errStillOpen makes
// removing do that, after a backoff that gives such a part time to land.
func (b *Bucket) abortMultipart(ctx context.Context, key, uploadID string) error {
	_, err := b.c.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{
		Bucket: aws.String(b.Target.Name), Key: aws.String(key), UploadId: aws.String(uploadID),
	})
	if err != nil && !IsNotFound(err) {
		return fmt.Errorf("abort multipart %s/%s: %w", b.Target.Name, key, err)
	}
	_, err = b.c.ListParts(ctx, &s3.ListPartsInput{
		Bucket: aws.String(b.Target.Name), Key: aws.String(key), UploadId: aws.String(uploadID), MaxParts: aws.Int32(1),
	})
	switch {
	case IsNotFound(err):
		return nil
	case err != nil:
		return fmt.Errorf("check the abort of %s/%s: %w", b.Target.Name, key, err)
	}
	return fmt.Errorf("abort multipart %s/%s (upload %s): %w", b.Target.Name, key, uploadID, errStillOpen)
}

// Delete removes an object; absent objects are not an error (see
// removing).
func (b *Bucket) Delete(ctx context.Context, key string) error {
	return b.removing(ctx, func(ctx context.Context) error { return b.delete(ctx, key) })
}

func (b *Bucket) delete(ctx context.Context, key string) error {
	_, err := b.c.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(b.Target.Name), Key: aws.String(key)})
	if err != nil && !IsNotFound(err) {
		return fmt.Errorf("delete %s/%s: %w", b.Target.Name, key, err)
	}
	return nil
}

// DeleteIf removes key only while the object there matches, and reports
// whether it did. It cleans up after a write whose answer was lost under a
// key that may hold an older object (a client's key): match tells this
// write's object from the older one, so if the write never landed the
// older object stays. A HEAD and a DELETE are not one step: a write
// landing between them is removed too. Like Delete it retries and
// outlives ctx's cancellation.
func (b *Bucket) DeleteIf(ctx context.Context, key string, match func(ObjectInfo) bool) (bool, error) {
	deleted, unanswered := false, false
	err := b.removing(ctx, func(ctx context.Context) error {
		info, err := b.Head(ctx, key)
		if IsNotFound(err) {
			deleted = unanswered // gone by an earlier try's delete
			return nil
		}
		if err != nil {
			return err
		}
		if !match(info) {
			return nil
		}
		if err := b.delete(ctx, key); err != nil {
			unanswered = MayHaveLanded(err)
			return err
		}
		deleted = true
		return nil
	})
	return deleted, err
}

// AbortUploads aborts every open multipart upload of exactly key and
// returns how many it aborted. It cleans up after a CreateMultipartUpload
// whose answer was lost, so only for a key no other writer uses: the
// upload id is unknown, and any upload of the key is taken for it. Like
// Delete it retries and outlives ctx's cancellation.
func (b *Bucket) AbortUploads(ctx context.Context, key string) (int, error) {
	aborted := 0
	err := b.removing(ctx, func(ctx context.Context) error {
		in := &s3.ListMultipartUploadsInput{Bucket: aws.String(b.Target.Name), Prefix: aws.String(key)}
		for {
			out, err := b.c.ListMultipartUploads(ctx, in)
			if err != nil {
				return fmt.Errorf("list multipart uploads %s/%s: %w", b.Target.Name, key, err)
			}
			for _, u := range out.Uploads {
				if aws.ToString(u.Key) != key {
					continue
				}
				if err := b.abortMultipart(ctx, key, aws.ToString(u.UploadId)); err != nil {
					return err
				}
				aborted++
			}
			if !aws.ToBool(out.IsTruncated) {
				return nil
			}
			in.KeyMarker, in.UploadIdMarker = out.NextKeyMarker, out.NextUploadIdMarker
		}
	})
	return aborted, err
}
