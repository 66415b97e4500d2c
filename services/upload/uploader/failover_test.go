package uploader_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

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
// the service cannot know it completed. The upload fails UNAVAILABLE and leaves no object, no open
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
	st.Proxies[first].SetForNext("PutObject", faultproxy.Error5xx, 1) // a PUT is tried once
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
		rows, err := st.bucketStatus(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		var got int32 = -1
		if b, ok := rows[bucket]; ok {
			got = b.GetConsecutiveFailures()
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

// Under a client's key, the cleanup after a write whose answer never came
// removes the object only if the write landed: a write that never reached
// the bucket leaves the older object there intact, even one with the same
// bytes; one that landed is removed (its bytes are not counted). A small
// upload then lands on the next bucket; a multipart one, its parts sent,
// fails UNAVAILABLE. What GetObject returns keeps the client's metadata
// and not the service's write id.
func TestUnansweredWriteKeepsTheOlderObject(t *testing.T) {
	for _, tc := range []struct {
		name, op string
		size     int
		failover bool
	}{
		{"put", "PutObject", 1000, true},
		{"multipart", "CompleteMultipartUpload", 9 << 20, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := startStack(t, 2, func(c *uploader.Config) { c.DataTimeout, c.CallTimeout = 2*time.Second, 2*time.Second })
			first, second := st.Buckets[0], st.Buckets[1].GetId()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			const key = "docs/report.bin"
			hdr := &uploadv1.UploadHeader{Key: key, ContentType: "application/octet-stream", Size: int64(tc.size), Metadata: map[string]string{"owner": "tests"}}
			older := testenv.OpaqueBytes(t, tc.size)
			if resp, err := send(ctx, st.Upload, hdr, older); err != nil || resp.GetBucketId() != first.GetId() {
				t.Fatalf("first upload: %v on %s", err, resp.GetBucketId())
			}
			stored := func() ([]byte, bool) {
				t.Helper()
				out, err := st.S3.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(first.GetName()), Key: aws.String(key)})
				if err != nil {
					return nil, false
				}
				defer out.Body.Close()
				data, err := io.ReadAll(out.Body)
				if err != nil {
					t.Fatal(err)
				}
				return data, true
			}

			info, _, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: first.GetId(), Key: key})
			if err != nil || len(info.GetMetadata()) != 1 || info.GetMetadata()["owner"] != "tests" {
				t.Fatalf("metadata read back: %v (%v), want only the client's", info.GetMetadata(), err)
			}

			// The write never reaches the bucket: the older object stays,
			// though it holds the very same bytes.
			st.Proxies[first.GetId()].SetFor(tc.op, faultproxy.Reset)
			retry := func(fault string, data []byte) {
				t.Helper()
				resp, err := send(ctx, st.Upload, hdr, data)
				if tc.failover && (err != nil || resp.GetBucketId() != second) {
					t.Fatalf("upload while %s %s: %v on %s, want %s", tc.op, fault, err, resp.GetBucketId(), second)
				}
				if !tc.failover && status.Code(err) != codes.Unavailable {
					t.Fatalf("upload while %s %s: %v, want Unavailable", tc.op, fault, err)
				}
			}
			retry("resets", older)
			if got, ok := stored(); !ok || !bytes.Equal(got, older) {
				t.Fatalf("the older object under the client's key was removed (present %v) though the write never landed", ok)
			}

			// The write lands and its answer is lost: it is removed.
			st.Proxies[first.GetId()].SetFor(tc.op, faultproxy.LoseResponse)
			retry("loses answers", testenv.OpaqueBytes(t, tc.size+1)[1:])
			if got, ok := stored(); ok {
				t.Fatalf("a landed write whose usage is not counted is still there (%d bytes)", len(got))
			}
			if _, multiparts := st.objects(t); multiparts[first.GetId()] != 0 {
				t.Fatalf("%d open multipart uploads left", multiparts[first.GetId()])
			}
			st.waitNoReservations(t)
		})
	}
}

// CreateMultipartUpload lands but its answer is lost, so the service never
// learns the upload id. The upload goes to the next bucket, and the
// possibly created upload, under a key made for this upload alone, is
// aborted: no open multipart upload is left on the first bucket.
func TestLostCreateLeavesNoUpload(t *testing.T) {
	st := startStack(t, 2, func(c *uploader.Config) { c.CallTimeout = 2 * time.Second })
	first, second := st.Buckets[0].GetId(), st.Buckets[1].GetId()
	st.Proxies[first].SetFor("CreateMultipartUpload", faultproxy.LoseResponse)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 9<<20)
	resp, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "big.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
	if err != nil || resp.GetBucketId() != second {
		t.Fatalf("upload: %v on %s, want %s", err, resp.GetBucketId(), second)
	}
	if objects, multiparts := st.objects(t); objects[first] != 0 || multiparts[first] != 0 {
		t.Fatalf("%d objects and %d open multipart uploads left on %s, want none", objects[first], multiparts[first], first)
	}
	st.waitNoReservations(t)
}
