package objstore

import (
	"context"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// DeleteIf removes key only while the object there matches, and reports
// whether it did. It cleans up after a write whose answer was lost under a
// key that may hold an older object (a client's key): match tells this
// write's object from the older one, so if the write never landed the
// older object stays. A HEAD and a DELETE are not one step: a write
// landing between them is removed too. Like Delete it outlives ctx's
// cancellation.
func (b *Bucket) DeleteIf(ctx context.Context, key string, match func(ObjectInfo) bool) (bool, error) {
	ctx = context.WithoutCancel(ctx)
	info, err := b.Head(ctx, key)
	if IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !match(info) {
		return false, nil
	}
	return true, b.Delete(ctx, key)
}

// AbortUploads aborts every open multipart upload of exactly key and
// returns how many it aborted. It cleans up after a CreateMultipartUpload
// whose answer was lost, so only for a key no other writer uses: the
// upload id is unknown, and any upload of the key is taken for it. Like
// Delete it outlives ctx's cancellation.
func (b *Bucket) AbortUploads(ctx context.Context, key string) (int, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.s.opts.CallTimeout)
	defer cancel()
	in := &s3.ListMultipartUploadsInput{Bucket: aws.String(b.Target.Name), Prefix: aws.String(key)}
	aborted := 0
	for {
		out, err := b.c.ListMultipartUploads(ctx, in)
		if err != nil {
			return aborted, fmt.Errorf("list multipart uploads %s/%s: %w", b.Target.Name, key, err)
		}
		for _, u := range out.Uploads {
			if aws.ToString(u.Key) != key {
				continue
			}
			if err := b.AbortMultipart(ctx, key, aws.ToString(u.UploadId)); err != nil {
				return aborted, err
			}
			aborted++
		}
		if !aws.ToBool(out.IsTruncated) {
			return aborted, nil
		}
		in.KeyMarker, in.UploadIdMarker = out.NextKeyMarker, out.NextUploadIdMarker
	}
}
