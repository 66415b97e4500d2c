package objstore

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"strconv"
	"strings"
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
