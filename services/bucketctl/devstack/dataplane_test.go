package devstack_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

func put(ctx context.Context, env *e2e.Env, data []byte, hdr *uploadv1.UploadHeader) (*uploadv1.UploadResponse, error) {
	if hdr == nil {
		hdr = &uploadv1.UploadHeader{}
	}
	if hdr.NameHint == "" && hdr.Key == "" {
		hdr.NameHint = "f.bin"
	}
	if hdr.ContentType == "" {
		hdr.ContentType = "application/octet-stream"
	}
	if hdr.Size == 0 {
		hdr.Size = int64(len(data))
	}
	return uploadclient.Upload(ctx, env.Upload, hdr, bytes.NewReader(data), uploadclient.Options{})
}

// The seed system's load test: 100 concurrent uploads, all readable with
// matching sha256, and usage equal to the sum of their sizes.
func TestHundredConcurrentUploads(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	usedBefore, _ := env.Usage(t)
	type result struct {
		resp *uploadv1.UploadResponse
		sha  string
	}
	results := make([]result, 100)
	var wg sync.WaitGroup
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			size := 1024 + (i*7919)%(256<<10)
			if i%25 == 0 {
				size = 9 << 20 // a few multipart uploads in the mix
			}
			data := e2e.RandomBytes(t, size)
			resp, err := put(ctx, env, data, &uploadv1.UploadHeader{Sha256: e2e.HexSHA(data)})
			if err != nil {
				t.Errorf("upload %d: %v", i, err)
				return
			}
			results[i] = result{resp, e2e.HexSHA(data)}
		}(i)
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	sum := int64(0)
	for i, r := range results {
		var back bytes.Buffer
		if _, err := uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: r.resp.GetBucketId(), Key: r.resp.GetKey()}, &back, nil); err != nil {
			t.Fatalf("get %d: %v", i, err)
		}
		if e2e.HexSHA(back.Bytes()) != r.sha {
			t.Fatalf("object %d reads back differently", i)
		}
		sum += r.resp.GetSize()
	}
	used, reserved := env.Usage(t)
	grew := int64(0)
	for id, u := range used {
		grew += u - usedBefore[id]
	}
	if grew != sum {
		t.Fatalf("usage grew by %d, want the sum of sizes %d", grew, sum)
	}
	e2e.WaitNoReservations(t, env, reserved)
}

// A fault-injecting proxy in front of the priority-1 bucket: uploads keep
// succeeding on the other buckets, and after 3 failures the bucket cools
// down for every replica.
func TestFailoverAndCooldown(t *testing.T) {
	modes := []struct {
		name string
		mode faultproxy.Mode
	}{
		{"5xx", faultproxy.Error5xx},
		{"connection reset", faultproxy.Reset},
		{"throttled 429", faultproxy.Throttle},
		{"stall", faultproxy.Stall},
		// 400s that S3 sends when the path, not the request, failed.
		{"400 RequestTimeout", faultproxy.RequestTimeout},
		{"400 IncompleteBody", faultproxy.IncompleteBody},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			var proxy *faultproxy.Proxy
			env := e2e.StartWith(t, devstack.Options{
				Endpoint: func(id, gw string) string {
					if id != "dev-hot" {
						return gw
					}
					p, err := faultproxy.New(gw)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(p.Close)
					p.StallFor = 2 * time.Second
					proxy = p
					return p.URL()
				},
				Tune: func(a *allocator.Config, u *uploader.Config) {
					a.ProbeStore = nil // count only the uploads' failures
					u.DataTimeout, u.CallTimeout = 500*time.Millisecond, 500*time.Millisecond
					u.BackoffBase = time.Millisecond
				},
			})
			proxy.Set(m.mode)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for i := 0; i < 5; i++ {
				data := e2e.RandomBytes(t, 10_000)
				resp, err := put(ctx, env, data, nil)
				if err != nil {
					t.Fatalf("upload %d failed despite healthy buckets: %v", i, err)
				}
				if resp.GetBucketId() == "dev-hot" {
					t.Fatalf("upload %d landed on the failing bucket", i)
				}
			}
			st, err := env.Admin.GetStatus(env.AdminCtx(ctx), nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, b := range st.GetBuckets() {
				if b.GetBucket().GetId() == "dev-hot" {
					if !b.GetCoolingDown() || b.GetConsecutiveFailures() != 3 || b.GetHealthScore() >= 50 {
						t.Fatalf("dev-hot: cooling=%v failures=%d score=%d; want cooling after exactly 3 failures, score < 50",
							b.GetCoolingDown(), b.GetConsecutiveFailures(), b.GetHealthScore())
					}
				}
			}
			if objects, multiparts := env.ObjectCount(t); objects != 5 || multiparts != 0 {
				t.Fatalf("%d objects and %d open multipart uploads, want exactly the 5 uploaded and none open", objects, multiparts)
			}
		})
	}
}

// A client that cancels mid-stream, or whose deadline passes mid-stream,
// leaves no object, no open multipart upload, and gets its capacity back.
func TestCancelMidStream(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	// Each way of ending returns the stream's context and, once it has sent
	// part of the object, ends the stream.
	ends := map[string]func() (context.Context, func()){
		"cancel": func() (context.Context, func()) {
			ctx, cancel := context.WithCancel(context.Background())
			return ctx, cancel
		},
		"deadline": func() (context.Context, func()) {
			// Long enough to send three quarters of the object on a slow
			// machine; if it runs out sooner, it still ends mid-stream.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			return ctx, func() { <-ctx.Done(); cancel() }
		},
	}
	for how, start := range ends {
		for _, size := range []int{1 << 20, 40 << 20} {
			t.Run(fmt.Sprintf("%s at %d bytes", how, size), func(t *testing.T) {
				ctx, end := start()
				stream, err := env.Upload.Upload(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if err := stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: &uploadv1.UploadHeader{
					NameHint: "c.bin", ContentType: "application/octet-stream", Size: int64(size)}}}); err != nil {
					t.Fatal(err)
				}
				chunk := e2e.RandomBytes(t, 256<<10)
				for sent := 0; sent < size*3/4; sent += len(chunk) {
					if err := stream.Send(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: chunk}}); err != nil {
						if ctx.Err() != nil {
							break // the deadline came first
						}
						t.Fatal(err)
					}
				}
				end()
				if _, err := stream.CloseAndRecv(); status.Code(err) != status.FromContextError(ctx.Err()).Code() {
					t.Fatalf("upload after %s: %v, want %v", how, err, status.FromContextError(ctx.Err()).Code())
				}
				deadline := time.Now().Add(15 * time.Second)
				for {
					objects, multiparts := env.ObjectCount(t)
					_, reserved := env.Usage(t)
					total := int64(0)
					for _, r := range reserved {
						total += r
					}
					if objects == 0 && multiparts == 0 && total == 0 {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("after %s: %d objects, %d open multipart uploads, %d bytes reserved", how, objects, multiparts, total)
					}
					time.Sleep(20 * time.Millisecond)
				}
				used, _ := env.Usage(t)
				for id, u := range used {
					if u != 0 {
						t.Fatalf("bucket %s counts %d bytes of an upload ended by %s", id, u, how)
					}
				}
			})
		}
	}
}

// Bad input: the right code, nothing stored, usage unchanged.
func TestBadInputTable(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{Tune: func(_ *allocator.Config, u *uploader.Config) { u.MaxObjectSize = 32 << 20 }})
	png := []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89")
	big := e2e.RandomBytes(t, 20<<20)
	elf := append([]byte("\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00"), e2e.RandomBytes(t, 100)...)
	wrongSHA := e2e.HexSHA([]byte("something else"))
	cases := []struct {
		name string
		data []byte
		hdr  *uploadv1.UploadHeader
		want codes.Code
		// field is the google.rpc.BadRequest field violation expected.
		field string
	}{
		{"leading slash key", png, &uploadv1.UploadHeader{Key: "/abs.png", ContentType: "image/png"}, codes.InvalidArgument, "header.key"},
		{"key ending in a slash", png, &uploadv1.UploadHeader{Key: "photos/", ContentType: "image/png"}, codes.InvalidArgument, "header.key"},
		{"dotdot key", png, &uploadv1.UploadHeader{Key: "a/../b.png", ContentType: "image/png"}, codes.InvalidArgument, "header.key"},
		{"bidi override in key", png, &uploadv1.UploadHeader{Key: "inv\u202egnp.exe", ContentType: "image/png"}, codes.InvalidArgument, "header.key"},
		{"control char key", png, &uploadv1.UploadHeader{Key: "a\x01.png", ContentType: "image/png"}, codes.InvalidArgument, "header.key"},
		{"type not allowed", elf, &uploadv1.UploadHeader{ContentType: "application/x-msdownload"}, codes.InvalidArgument, "header.content_type"},
		{"executable posing as binary", elf, &uploadv1.UploadHeader{ContentType: "application/octet-stream"}, codes.InvalidArgument, "header.content_type"},
		{"text posing as png", []byte("just some text, not an image"), &uploadv1.UploadHeader{ContentType: "image/png"}, codes.InvalidArgument, "header.content_type"},
		{"checksum mismatch small", png, &uploadv1.UploadHeader{ContentType: "image/png", Sha256: wrongSHA}, codes.InvalidArgument, "header.sha256"},
		{"checksum mismatch multipart", big, &uploadv1.UploadHeader{Sha256: wrongSHA}, codes.InvalidArgument, "header.sha256"},
		{"malformed checksum", png, &uploadv1.UploadHeader{ContentType: "image/png", Sha256: "xyz"}, codes.InvalidArgument, "header.sha256"},
		{"too large", png, &uploadv1.UploadHeader{ContentType: "image/png", Size: 64 << 20}, codes.InvalidArgument, "header.size"},
		{"negative size", png, &uploadv1.UploadHeader{ContentType: "image/png", Size: -1}, codes.InvalidArgument, "header.size"},
		{"multipart short by one byte", big, &uploadv1.UploadHeader{Size: int64(len(big)) + 1}, codes.InvalidArgument, "header.size"},
		{"resumable not enabled", png, &uploadv1.UploadHeader{ContentType: "image/png", Resumable: true}, codes.Unimplemented, ""},
		{"reserved metadata key", png, &uploadv1.UploadHeader{ContentType: "image/png", Metadata: map[string]string{"Bucketlb-Write-Id": "x"}}, codes.InvalidArgument, "header.metadata"},
		{"reserved sha256 metadata key", png, &uploadv1.UploadHeader{ContentType: "image/png", Metadata: map[string]string{"bucketlb-sha256": "x"}}, codes.InvalidArgument, "header.metadata"},
		{"metadata value with a line break", png, &uploadv1.UploadHeader{ContentType: "image/png", Metadata: map[string]string{"note": "one\ntwo"}}, codes.InvalidArgument, "header.metadata"},
		{"metadata keys differing only in case", png, &uploadv1.UploadHeader{ContentType: "image/png", Metadata: map[string]string{"Author": "a", "author": "b"}}, codes.InvalidArgument, "header.metadata"},
		{"metadata key not ASCII", png, &uploadv1.UploadHeader{ContentType: "image/png", Metadata: map[string]string{"clé": "v"}}, codes.InvalidArgument, "header.metadata"},
		{"metadata over 2 KB", png, &uploadv1.UploadHeader{ContentType: "image/png", Metadata: map[string]string{"note": strings.Repeat("x", 2048)}}, codes.InvalidArgument, "header.metadata"},
		// A header net/http will not send, or that S3 signs differently:
		// the client's fault, refused before any byte is stored, never a
		// failure of every bucket in turn.
		{"control char in a content type parameter", png, &uploadv1.UploadHeader{ContentType: "image/png; charset=\"utf-8\x01\""}, codes.InvalidArgument, "header.content_type"},
		{"content type not ASCII", png, &uploadv1.UploadHeader{ContentType: "image/png; name=\"café\""}, codes.InvalidArgument, "header.content_type"},
		{"metadata entries over the request header budget", png, &uploadv1.UploadHeader{ContentType: "image/png", Metadata: manyEntries(200)}, codes.InvalidArgument, "header.metadata"},
		{"metadata key of 100 KB", png, &uploadv1.UploadHeader{ContentType: "image/png", Metadata: map[string]string{strings.Repeat("k\n", 50_000): "v"}}, codes.InvalidArgument, "header.metadata"},
		{"content type of 100 KB", png, &uploadv1.UploadHeader{ContentType: strings.Repeat("t", 100_000)}, codes.InvalidArgument, "header.content_type"},
		{"affinity key of 100 KB", png, &uploadv1.UploadHeader{ContentType: "image/png", AffinityKey: strings.Repeat("a", 100_000)}, codes.InvalidArgument, "header.affinity_key"},
		// Keys the service allows but the bucket refuses (the local
		// gateway stores each key segment as a file name of at most 255
		// bytes): the bucket's reason, never INTERNAL.
		{"key the bucket refuses", png, &uploadv1.UploadHeader{Key: strings.Repeat("s", 300) + ".png", ContentType: "image/png"}, codes.InvalidArgument, ""},
	}
	usedBefore, _ := env.Usage(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_, err := put(ctx, env, tc.data, tc.hdr)
			if status.Code(err) != tc.want {
				t.Fatalf("code %v (%v), want %v", status.Code(err), err, tc.want)
			}
			if msg := status.Convert(err).Message(); len(msg) < 15 || len(msg) > 400 {
				t.Fatalf("message of %d bytes %.400q is not a sentence", len(msg), msg)
			}
			if got := violatedField(err); got != tc.field {
				t.Fatalf("field violation %q, want %q", got, tc.field)
			}
		})
	}
	objects, multiparts := env.ObjectCount(t)
	if objects != 0 || multiparts != 0 {
		t.Fatalf("bad input left %d objects and %d open multipart uploads", objects, multiparts)
	}
	used, reserved := env.Usage(t)
	for id, u := range used {
		if u != usedBefore[id] {
			t.Fatalf("usage of %s changed on bad input: %d -> %d", id, usedBefore[id], u)
		}
	}
	e2e.WaitNoReservations(t, env, reserved)
	// Bad input is the client's fault, never a bucket's.
	st, err := env.Admin.GetStatus(env.AdminCtx(context.Background()), &adminv1.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range st.GetBuckets() {
		if b.GetConsecutiveFailures() != 0 || b.GetCoolingDown() {
			t.Fatalf("bad input counted against bucket %s: %d failures, cooling down %v", b.GetBucket().GetId(), b.GetConsecutiveFailures(), b.GetCoolingDown())
		}
	}
}

// manyEntries is n metadata entries of one byte each: within S3's 2 KB of
// keys and values, beyond its 8 KB of request headers.
func manyEntries(n int) map[string]string {
	md := make(map[string]string, n)
	for i := range n {
		md[fmt.Sprintf("k%03d", i)] = "v"
	}
	return md
}

// A request a bucket refuses for what it asks gets the bucket's reason in
// a sentence, with a status that says whose fault it is, on every call:
// a key that clashes with what the bucket holds (the local gateway keeps
// "a/b" as a file in a directory "a", so "a" cannot be an object too) is
// FAILED_PRECONDITION, a key it will not take is INVALID_ARGUMENT.
func TestBucketRefusalsSayWhy(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := e2e.RandomBytes(t, 1000)
	first, err := put(ctx, env, data, &uploadv1.UploadHeader{Key: "dir/x.bin"})
	if err != nil {
		t.Fatal(err)
	}
	bucket := first.GetBucketId()
	sentence := func(t *testing.T, err error, want codes.Code) {
		t.Helper()
		msg := status.Convert(err).Message()
		if status.Code(err) != want || !strings.HasPrefix(msg, "the bucket refused the request: ") || strings.Contains(msg, "RequestID") || len(msg) > 300 {
			t.Fatalf("%v, want %v with the bucket's reason and no SDK details", err, want)
		}
	}
	_, err = put(ctx, env, data, &uploadv1.UploadHeader{Key: "dir"})
	sentence(t, err, codes.FailedPrecondition)
	long := strings.Repeat("s", 300)
	stream, err := env.Upload.GetObject(ctx, &uploadv1.GetObjectRequest{BucketId: bucket, Key: long})
	if err == nil {
		_, err = stream.Recv()
	}
	sentence(t, err, codes.InvalidArgument)
	_, err = env.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: bucket, Key: long})
	sentence(t, err, codes.InvalidArgument)
	if objects, multiparts := env.ObjectCount(t); objects != 1 || multiparts != 0 {
		t.Fatalf("%d objects and %d open multipart uploads, want the first object only", objects, multiparts)
	}
}

// A chunk over uploader.MaxChunk is refused and leaves nothing behind:
// with INVALID_ARGUMENT naming the chunk, or, past the service's gRPC
// message limit, with gRPC's own RESOURCE_EXHAUSTED (gRPC answers that
// itself, from the length prefix, before the message takes any memory).
// Chunks of exactly MaxChunk are fine, small object or multipart.
func TestChunkSizeLimit(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	usedBefore, _ := env.Usage(t)
	small, large := e2e.RandomBytes(t, 3<<20), e2e.RandomBytes(t, 12<<20)
	send := func(data []byte, chunk int) (*uploadv1.UploadResponse, error) {
		hdr := &uploadv1.UploadHeader{NameHint: "f.bin", ContentType: "application/octet-stream", Size: int64(len(data))}
		return uploadclient.Upload(ctx, env.Upload, hdr, bytes.NewReader(data), uploadclient.Options{ChunkSize: chunk, Retries: -1})
	}
	for _, data := range [][]byte{small, large} {
		_, err := send(data, uploader.MaxChunk+1)
		if status.Code(err) != codes.InvalidArgument || violatedField(err) != "chunk" ||
			!strings.Contains(status.Convert(err).Message(), "chunks of at most 1048576 bytes") {
			t.Fatalf("%d bytes in chunks of 1 MiB + 1: %v, want InvalidArgument naming the chunk", len(data), err)
		}
		_, err = send(data, 2<<20)
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), "larger than max") {
			t.Fatalf("%d bytes in chunks of 2 MiB: %v, want gRPC's message limit", len(data), err)
		}
	}
	objects, multiparts := env.ObjectCount(t)
	if objects != 0 || multiparts != 0 {
		t.Fatalf("refused chunks left %d objects and %d open multipart uploads", objects, multiparts)
	}
	for _, data := range [][]byte{small, large} {
		resp, err := send(data, uploader.MaxChunk)
		if err != nil {
			t.Fatalf("%d bytes in chunks of exactly %d: %v", len(data), uploader.MaxChunk, err)
		}
		if resp.GetSha256() != e2e.HexSHA(data) {
			t.Fatalf("sha256 %s, want %s", resp.GetSha256(), e2e.HexSHA(data))
		}
	}
	oneObjectPerKey(t, env, 2, sum(usedBefore)+int64(len(small)+len(large)))
}

// A declared sha256 in upper case (PowerShell's Get-FileHash prints it so)
// is the same digest: small and multipart uploads land, the answer is in
// lower case, and a retry under the idempotency key is a replay.
func TestUppercaseSHA256(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i, data := range [][]byte{e2e.RandomBytes(t, 1000), e2e.RandomBytes(t, 12<<20)} {
		hdr := func() *uploadv1.UploadHeader {
			return &uploadv1.UploadHeader{Sha256: strings.ToUpper(e2e.HexSHA(data)), IdempotencyKey: fmt.Sprintf("upper-%d", i)}
		}
		first, err := put(ctx, env, data, hdr())
		if err != nil || first.GetSha256() != e2e.HexSHA(data) {
			t.Fatalf("%d bytes with an upper-case sha256: %v, %v", len(data), first, err)
		}
		again, err := put(ctx, env, data, hdr())
		if err != nil || !again.GetReplayed() || again.GetKey() != first.GetKey() {
			t.Fatalf("retry with an upper-case sha256: %v, %v; want a replay of %v", again, err, first)
		}
	}
}

// GetObject and DeleteObject hold names to the rules Upload writes by:
// a name no upload could have stored is INVALID_ARGUMENT naming the field,
// in a short sentence, never an internal error quoting 100 KB back.
func TestReadAndDeleteRefuseBadNames(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name, bucket, key, field string
	}{
		{"bucket id of 100 KB", strings.Repeat("b", 100_000), "k", "bucket_id"},
		{"key of 100 KB", "dev-hot", strings.Repeat("k", 100_000), "key"},
		{"dotdot key", "dev-hot", "a/../b", "key"},
		{"no key", "dev-hot", "", "key"},
	} {
		_, getErr := uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: tc.bucket, Key: tc.key}, io.Discard, nil)
		_, delErr := env.Upload.DeleteObject(ctx, &uploadv1.DeleteObjectRequest{BucketId: tc.bucket, Key: tc.key})
		for op, err := range map[string]error{"get": getErr, "delete": delErr} {
			if msg := status.Convert(err).Message(); status.Code(err) != codes.InvalidArgument || violatedField(err) != tc.field || len(msg) > 400 {
				t.Fatalf("%s with a %s: %v (%d bytes), want InvalidArgument on %s", op, tc.name, status.Code(err), len(msg), tc.field)
			}
		}
	}
	for _, tc := range []struct {
		offset, length int64
		field          string
	}{{-1, 0, "offset"}, {0, -1, "length"}} {
		_, err := uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: "dev-hot", Key: "k", Offset: tc.offset, Length: tc.length}, io.Discard, nil)
		if status.Code(err) != codes.InvalidArgument || violatedField(err) != tc.field {
			t.Fatalf("get with offset %d and length %d: %v on %q, want InvalidArgument on %s", tc.offset, tc.length, err, violatedField(err), tc.field)
		}
	}
}

// An object read back whole is checked against the sha256 it was stored
// with: known for every object of one part, and for a multipart object
// whose upload declared it. Bytes changed in the bucket behind the
// service's back fail the read: the service answers DATA_LOSS, which the
// client reports as ErrChecksumMismatch. A range read is not checked.
func TestReadsCheckTheStoredSHA256(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	small, large := e2e.RandomBytes(t, 1000), e2e.RandomBytes(t, 12<<20)
	for _, tc := range []struct {
		name    string
		data    []byte
		declare bool
		want    string
	}{
		{"small", small, false, e2e.HexSHA(small)},
		{"multipart, declared", large, true, e2e.HexSHA(large)},
		{"multipart, not declared", large, false, ""},
	} {
		hdr := &uploadv1.UploadHeader{Metadata: map[string]string{"note": "x"}}
		if tc.declare {
			hdr.Sha256 = e2e.HexSHA(tc.data)
		}
		resp, err := put(ctx, env, tc.data, hdr)
		if err != nil {
			t.Fatal(err)
		}
		var back bytes.Buffer
		info, err := uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}, &back, nil)
		if err != nil || info.GetSha256() != tc.want || len(info.GetMetadata()) != 1 || !bytes.Equal(back.Bytes(), tc.data) {
			t.Fatalf("%s: read back sha256 %q (want %q), metadata %v, err %v", tc.name, info.GetSha256(), tc.want, info.GetMetadata(), err)
		}
	}

	// Other bytes under the small object's key, with its metadata.
	resp, err := put(ctx, env, small, nil)
	if err != nil {
		t.Fatal(err)
	}
	other := e2e.RandomBytes(t, len(small))
	if _, err := env.Direct(t, resp.GetBucketId()).Put(ctx, objstore.PutInput{Key: resp.GetKey(), ContentType: "application/octet-stream", Metadata: map[string]string{"bucketlb-sha256": resp.GetSha256()}}, other); err != nil {
		t.Fatal(err)
	}
	req := &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}
	if _, err := uploadclient.Get(ctx, env.Upload, req, io.Discard, nil); !errors.Is(err, uploadclient.ErrChecksumMismatch) || status.Code(err) != codes.DataLoss {
		t.Fatalf("read of changed bytes: %v, want ErrChecksumMismatch from the server's DATA_LOSS", err)
	}
	req.Offset, req.Length = 10, 100
	if _, err := uploadclient.Get(ctx, env.Upload, req, io.Discard, nil); err != nil {
		t.Fatalf("range read of changed bytes: %v, want no check", err)
	}
}

// User metadata comes back as sent, values in any script; S3 keeps keys
// in lower case.
func TestMetadataRoundTrip(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resp, err := put(ctx, env, e2e.RandomBytes(t, 100), &uploadv1.UploadHeader{Metadata: map[string]string{"title": "Café à Zürich", "Shot-By": "ann"}})
	if err != nil {
		t.Fatal(err)
	}
	info, err := uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}, io.Discard, nil)
	if err != nil {
		t.Fatal(err)
	}
	if md := info.GetMetadata(); len(md) != 2 || md["title"] != "Café à Zürich" || md["shot-by"] != "ann" {
		t.Fatalf("metadata read back %q", md)
	}
}

// An empty object is stored like any other: one PUT, readable back with
// its type (whole, or from offset 0 with a length), counted as 0 bytes
// once, replayed under its idempotency key.
// Bytes after a declared size of 0 are refused like any excess.
func TestEmptyObject(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const emptySHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	usedBefore, _ := env.Usage(t)
	hdr := func() *uploadv1.UploadHeader {
		return &uploadv1.UploadHeader{Key: "logs/empty.png", ContentType: "image/png", IdempotencyKey: "empty-1", Metadata: map[string]string{"kind": "placeholder"}}
	}
	first, err := put(ctx, env, nil, hdr())
	if err != nil {
		t.Fatalf("empty upload: %v", err)
	}
	if first.GetSize() != 0 || first.GetSha256() != emptySHA || first.GetKey() != "logs/empty.png" || first.GetReplayed() {
		t.Fatalf("empty upload answered %v", first)
	}
	var back bytes.Buffer
	info, err := uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: first.GetBucketId(), Key: first.GetKey()}, &back, nil)
	if err != nil || back.Len() != 0 || info.GetSize() != 0 || info.GetContentType() != "image/png" || info.GetMetadata()["kind"] != "placeholder" {
		t.Fatalf("read back %d bytes, info %v, err %v", back.Len(), info, err)
	}
	// A read from offset 0 with a length is an empty read, as of a file;
	// an offset past the end is out of range.
	info, err = uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: first.GetBucketId(), Key: first.GetKey(), Length: 100}, &back, nil)
	if err != nil || back.Len() != 0 || info.GetSize() != 0 || info.GetContentLength() != 0 {
		t.Fatalf("range read from 0: %d bytes, info %v, err %v", back.Len(), info, err)
	}
	if _, err := uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: first.GetBucketId(), Key: first.GetKey(), Offset: 1}, &back, nil); status.Code(err) != codes.OutOfRange {
		t.Fatalf("read from offset 1: %v, want OutOfRange", err)
	}
	again, err := put(ctx, env, nil, hdr())
	if err != nil || !again.GetReplayed() || again.GetBucketId() != first.GetBucketId() {
		t.Fatalf("retry = %v, %v; want a replay of %v", again, err, first)
	}
	_, err = uploadclient.Upload(ctx, env.Upload, &uploadv1.UploadHeader{NameHint: "x.txt", ContentType: "text/plain"}, strings.NewReader("not empty"), uploadclient.Options{})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "more than the 0 bytes") {
		t.Fatalf("data after a declared size of 0: %v, want InvalidArgument", err)
	}
	oneObjectPerKey(t, env, 1, sum(usedBefore))
}

func sum(m map[string]int64) int64 {
	total := int64(0)
	for _, v := range m {
		total += v
	}
	return total
}

// violatedField is the field of the first google.rpc.BadRequest violation
// err carries, or "".
func violatedField(err error) string {
	for _, d := range status.Convert(err).Details() {
		if br, ok := d.(*errdetails.BadRequest); ok && len(br.GetFieldViolations()) > 0 {
			return br.GetFieldViolations()[0].GetField()
		}
	}
	return ""
}

// R2 bills every PUT, part and list as a Class A operation: a small
// upload costs exactly one PUT, a large one parts + 2.
func TestS3RequestsPerUpload(t *testing.T) {
	proxies := map[string]*faultproxy.Proxy{}
	env := e2e.StartWith(t, devstack.Options{Endpoint: func(id, gw string) string {
		p, err := faultproxy.New(gw)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		proxies[id] = p
		return p.URL()
	}, Tune: func(a *allocator.Config, _ *uploader.Config) { a.ProbeStore = nil }})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	count := func() map[string]int {
		all := map[string]int{}
		for _, p := range proxies {
			for op, n := range p.Counts() {
				all[op] += n
			}
		}
		return all
	}
	count()
	if _, err := put(ctx, env, e2e.RandomBytes(t, 1024), nil); err != nil {
		t.Fatal(err)
	}
	if c := count(); len(c) != 1 || c["PutObject"] != 1 {
		t.Fatalf("small upload made S3 requests %v, want exactly one PutObject", c)
	}
	data := e2e.RandomBytes(t, 20<<20) // 3 parts of 8 MiB
	if _, err := put(ctx, env, data, nil); err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"CreateMultipartUpload": 1, "UploadPart": 3, "CompleteMultipartUpload": 1}
	c := count()
	if len(c) != len(want) {
		t.Fatalf("large upload made S3 requests %v, want %v", c, want)
	}
	for op, n := range want {
		if c[op] != n {
			t.Fatalf("large upload made S3 requests %v, want %v", c, want)
		}
	}
	_ = allocatorv1.Outcome_OUTCOME_SUCCESS
}
