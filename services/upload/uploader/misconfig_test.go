package uploader_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// A bucket that refuses every request because of how it is set up (its
// key was revoked, or the bucket was deleted) is the bucket's fault, not
// the upload's: uploads, small and multipart, go to the next bucket, and
// the broken one cools down after 3 failures like a failing one.
func TestMisconfiguredBucketFailsOver(t *testing.T) {
	for name, breakIt := range map[string]func(*adminv1.BucketSpec){
		"revoked key":    func(b *adminv1.BucketSpec) { b.CredentialsRef = "REVOKED" },
		"deleted bucket": func(b *adminv1.BucketSpec) { b.Name = "no-such-bucket-" + b.Name },
	} {
		t.Run(name, func(t *testing.T) {
			g := testenv.S3(t)
			st := startStackAt(t, []string{g.Endpoint, g.Endpoint},
				func(c *allocator.Config) { breakIt(c.Buckets[0]) },
				func(c *uploader.Config) {
					c.Credentials = objstore.StaticCredentials{"GW": {g.AccessKey, g.SecretKey}, "REVOKED": {g.AccessKey, "not-the-secret"}}
				})
			broken, good := st.Buckets[0].GetId(), st.Buckets[1].GetId()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for i, size := range []int{1000, 1001, 20 << 20} {
				data := testenv.OpaqueBytes(t, size)
				resp, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: fmt.Sprintf("m%d.bin", i), ContentType: "application/octet-stream", Size: int64(size)}, data)
				if err != nil {
					t.Fatalf("upload %d (%d bytes): %v", i, size, err)
				}
				if resp.GetBucketId() != good {
					t.Fatalf("upload %d landed on %s, want %s", i, resp.GetBucketId(), good)
				}
				readBack(ctx, t, st.Upload, resp, data, fmt.Sprintf("upload %d", i))
			}
			waitFailures(t, st, broken, 3)
			rows, err := st.bucketStatus(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !rows[broken].GetCoolingDown() {
				t.Fatalf("%s after 3 refusals: %v, want cooling down", broken, rows[broken])
			}
			used, _ := st.usage(t)
			if used[broken] != 0 || used[good] != 1000+1001+20<<20 {
				t.Fatalf("usage %v, want nothing on %s", used, broken)
			}
			st.waitNoReservations(t)
		})
	}
}

// A bucket whose keys this replica lacks (its secret is not mounted here)
// is this replica's problem, not the bucket's: uploads go to the next
// bucket without counting against the bucket's shared health, and a read
// from it fails UNAVAILABLE (another replica may have the keys) rather than
// as an internal error.
func TestBucketWithoutKeysOnThisReplica(t *testing.T) {
	g := testenv.S3(t)
	tel := newTelemetry(t, "upload-test")
	st := startStackAt(t, []string{g.Endpoint, g.Endpoint}, func(c *allocator.Config) { c.Buckets[0].CredentialsRef = "NOT-MOUNTED" },
		func(c *uploader.Config) { c.Metrics = tel.Metrics() })
	keyless, good := st.Buckets[0].GetId(), st.Buckets[1].GetId()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i, size := range []int{1000, 20 << 20} {
		data := testenv.OpaqueBytes(t, size)
		resp, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: fmt.Sprintf("k%d.bin", i), ContentType: "application/octet-stream", Size: int64(size)}, data)
		if err != nil {
			t.Fatalf("upload of %d bytes: %v", size, err)
		}
		if resp.GetBucketId() != good {
			t.Fatalf("upload of %d bytes landed on %s, want %s", size, resp.GetBucketId(), good)
		}
	}
	waitFailures(t, st, keyless, 0)
	// Operators see it as failovers for want of keys, not as bucket failures.
	failovers := func(r telemetry.FailoverReason) float64 {
		n, _ := testenv.MetricValue(t, tel.Registry(), "bucketlb_upload_failovers_total", map[string]string{"bucket": keyless, "reason": string(r)})
		return n
	}
	if noKeys, failed := failovers(telemetry.FailoverNoKeys), failovers(telemetry.FailoverBucketFailed); noKeys != 2 || failed != 0 {
		t.Fatalf("failovers from %s: %v for no_keys and %v for bucket_failed, want 2 and 0", keyless, noKeys, failed)
	}
	_, _, err := read(ctx, st.Upload, &uploadv1.GetObjectRequest{BucketId: keyless, Key: "any"})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("read from %s: %v, want Unavailable", keyless, err)
	}
	// The client learns which bucket, in one sentence, not how this
	// deployment keeps its keys.
	msg := status.Convert(err).Message()
	if !strings.Contains(msg, "has no keys for bucket "+keyless) || strings.Contains(msg, "NOT-MOUNTED") || strings.Contains(msg, "bucket failed") {
		t.Fatalf("read from %s answered %q, want it to say this replica has no keys for the bucket, without the credentials reference", keyless, msg)
	}
	st.waitNoReservations(t)
}

// An upload service whose service token the allocator refuses (a token
// rotated on one side only) answers UNAVAILABLE naming the service token,
// not PERMISSION_DENIED, which a client would take for its own
// credentials; nothing is stored and nothing counted.
func TestRefusedServiceToken(t *testing.T) {
	st := startStackAt(t, []string{testenv.S3(t).Endpoint},
		func(c *allocator.Config) { c.ServiceToken = "the-rotated-token" }, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := testenv.OpaqueBytes(t, 1024)
	_, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "t.bin", ContentType: "application/octet-stream", Size: int64(len(data))}, data)
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "service token") {
		t.Fatalf("upload through a refused service token: %v, want Unavailable naming the service token", err)
	}
	if used, reserved := st.usage(t); used[st.Buckets[0].GetId()] != 0 || reserved[st.Buckets[0].GetId()] != 0 {
		t.Fatalf("used %v reserved %v, want nothing", used, reserved)
	}
	if objects, multiparts := st.objects(t); objects[st.Buckets[0].GetName()]+multiparts[st.Buckets[0].GetName()] != 0 {
		t.Fatalf("left in the bucket: objects %v, multipart uploads %v", objects, multiparts)
	}
}
