package uploader_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// The preferred bucket stores each PUT but its answers are lost (the most
// ambiguous failure). Uploads still succeed on the next bucket, and the
// preferred bucket is left with no object that its usage does not count.
func TestLostResponsesLeaveNoOrphans(t *testing.T) {
	st := startStack(t, 2, func(c *uploader.Config) { c.DataTimeout, c.CallTimeout = 2*time.Second, 2*time.Second })
	first, second := st.Buckets[0].GetId(), st.Buckets[1].GetId()
	st.Proxies[first].Set(faultproxy.LoseResponse)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var total int64
	for i := 0; i < 2; i++ {
		data := testenv.OpaqueBytes(t, 10_000+i)
		sum := sha256.Sum256(data)
		resp, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "f.bin", ContentType: "application/octet-stream",
			Size: int64(len(data)), Sha256: hex.EncodeToString(sum[:])}, data)
		if err != nil {
			t.Fatalf("upload %d: %v", i, err)
		}
		if resp.GetBucketId() != second {
			t.Fatalf("upload %d landed on %s, want the healthy %s", i, resp.GetBucketId(), second)
		}
		total += int64(len(data))
	}
	objects, multiparts := st.objects(t)
	if objects[first] != 0 || objects[second] != 2 || multiparts[first]+multiparts[second] != 0 {
		t.Fatalf("objects %v, open multipart uploads %v; want none left on %s and 2 on %s", objects, multiparts, first, second)
	}
	used, _ := st.usage(t)
	if used[first] != 0 || used[second] != total {
		t.Fatalf("usage %v, want 0 on %s and %d on %s", used, first, total, second)
	}
	st.waitNoReservations(t)
}

// The answer to CompleteMultipartUpload is lost, so the object exists but
// the service cannot know it completed (the SDK's retry then finds no such
// upload). The upload fails UNAVAILABLE and leaves no object, no open
// multipart upload, no usage and no reservation.
func TestLostCompleteLeavesNothing(t *testing.T) {
	st := startStack(t, 1, nil)
	id := st.Buckets[0].GetId()
	st.Proxies[id].SetFor("CompleteMultipartUpload", faultproxy.LoseResponse)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 9<<20) // two parts
	_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "big.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("upload with a lost Complete: %v, want Unavailable", err)
	}
	objects, multiparts := st.objects(t)
	if objects[id] != 0 || multiparts[id] != 0 {
		t.Fatalf("%d objects and %d open multipart uploads left, want none", objects[id], multiparts[id])
	}
	if used, _ := st.usage(t); used[id] != 0 {
		t.Fatalf("usage %d after a failed upload", used[id])
	}
	st.waitNoReservations(t)
}

// A small upload reports its successful PUT through its Commit rather than
// a ReportOutcome call of its own: a bucket that failed once is back to
// no consecutive failures after the next upload lands on it.
func TestCommittedWriteCountsAsSuccess(t *testing.T) {
	st := startStack(t, 2, nil)
	first := st.Buckets[0].GetId()
	st.Proxies[first].SetForNext("PutObject", faultproxy.Error5xx, 2) // the SDK tries twice
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	hdr := &uploadv1.UploadHeader{NameHint: "f.bin", ContentType: "application/octet-stream", Size: 1000}
	data := testenv.OpaqueBytes(t, 1000)
	if resp, err := send(ctx, st.Upload, hdr, data); err != nil || resp.GetBucketId() == first {
		t.Fatalf("upload while %s fails: %v on %s", first, err, resp.GetBucketId())
	}
	waitFailures(t, st, first, 1)
	if resp, err := send(ctx, st.Upload, hdr, data); err != nil || resp.GetBucketId() != first {
		t.Fatalf("upload after the fault: %v on %s, want %s", err, resp.GetBucketId(), first)
	}
	waitFailures(t, st, first, 0)
}

// waitFailures polls the admin status until bucket shows want consecutive
// failures.
func waitFailures(t *testing.T, st *stack, bucket string, want int32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := st.Admin.GetStatus(st.adminCtx(ctx), &adminv1.GetStatusRequest{})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		var got int32 = -1
		for _, b := range resp.GetBuckets() {
			if b.GetBucket().GetId() == bucket {
				got = b.GetConsecutiveFailures()
			}
		}
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s shows %d consecutive failures, want %d", bucket, got, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
