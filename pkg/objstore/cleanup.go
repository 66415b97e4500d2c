package objstore

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// ObjectETag is the ETag a store gives an object written with one PUT of
// body: its hex MD5 (R2, S3 without SSE-KMS, versitygw).
func ObjectETag(body []byte) string {
	sum := md5.Sum(body)
	return hex.EncodeToString(sum[:])
}

// MultipartETag is the ETag S3-style stores give an object completed from
// parts: the hex MD5 of the parts' binary MD5s, a dash, the part count.
// It is "" when a part's ETag is not an MD5, and then says nothing.
func MultipartETag(parts []Part) string {
	h := md5.New()
	for _, p := range parts {
		sum, ok := PartETagMD5(p.ETag)
		if !ok {
			return ""
		}
		h.Write(sum)
	}
	return hex.EncodeToString(h.Sum(nil)) + "-" + strconv.Itoa(len(parts))
}

// DeleteIfETag removes key only while the object there has etag, and
// reports whether it did. It cleans up after a write whose answer was
// lost under a key that may hold an older object (a client's key): if the
// write never landed, the older object stays. A HEAD and a DELETE are not
// one step: a write landing between them is removed too. An empty etag
// matches nothing. Like Delete it outlives ctx's cancellation.
func (b *Bucket) DeleteIfETag(ctx context.Context, key, etag string) (bool, error) {
	ctx = context.WithoutCancel(ctx)
	info, err := b.Head(ctx, key)
	if IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if etag == "" || !strings.EqualFold(strings.Trim(info.ETag, `"`), strings.Trim(etag, `"`)) {
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
