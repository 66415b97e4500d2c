package devstack_test

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
)

// Invariant 3: an upload retried with the same idempotency key returns
// the first result and is counted once, also when the retries race.
func TestIdempotencyKey(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	data := e2e.RandomBytes(t, 50_000)

	first, err := put(ctx, env, data, &uploadv1.UploadHeader{IdempotencyKey: "order-1"})
	if err != nil || first.GetReplayed() {
		t.Fatalf("first upload: %v replayed=%v", err, first.GetReplayed())
	}
	again, err := put(ctx, env, data, &uploadv1.UploadHeader{IdempotencyKey: "order-1"})
	if err != nil {
		t.Fatal(err)
	}
	if !again.GetReplayed() || again.GetKey() != first.GetKey() || again.GetBucketId() != first.GetBucketId() || again.GetSha256() != first.GetSha256() {
		t.Fatalf("retry = %v, want a replay of %v", again, first)
	}

	// Eight racing uploads under one new key: one result, one object.
	var wg sync.WaitGroup
	results := make([]*uploadv1.UploadResponse, 8)
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := put(ctx, env, data, &uploadv1.UploadHeader{IdempotencyKey: "order-2"})
			if err != nil {
				t.Errorf("racing upload %d: %v", i, err)
				return
			}
			results[i] = r
		}(i)
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for _, r := range results {
		if r.GetKey() != results[0].GetKey() {
			t.Fatalf("racing uploads got different results: %s vs %s", r.GetKey(), results[0].GetKey())
		}
	}
	oneObjectPerKey(t, env, 2, 2*int64(len(data)))
}

// An idempotency key reused for another object fails FAILED_PRECONDITION
// instead of answering with the first object as if this one were stored,
// whether the key's record is there before the upload starts or a racing
// upload with other bytes commits first; nothing more is stored or counted.
func TestIdempotencyKeyReusedForAnotherObject(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, b := e2e.RandomBytes(t, 50_000), e2e.RandomBytes(t, 50_000)
	first, err := put(ctx, env, a, &uploadv1.UploadHeader{IdempotencyKey: "order-1", Key: "orders/1.bin"})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		data []byte
		hdr  *uploadv1.UploadHeader
	}{
		{"another size", a[:1000], &uploadv1.UploadHeader{IdempotencyKey: "order-1"}},
		{"another sha256", b, &uploadv1.UploadHeader{IdempotencyKey: "order-1", Sha256: e2e.HexSHA(b)}},
		{"another object key", a, &uploadv1.UploadHeader{IdempotencyKey: "order-1", Key: "orders/2.bin"}},
		// Bytes of the same size and no sha256 declared: a small object
		// is compared once received, under a name hint or the same key.
		{"other bytes, no sha256", b, &uploadv1.UploadHeader{IdempotencyKey: "order-1"}},
		{"other bytes, no sha256, same key", b, &uploadv1.UploadHeader{IdempotencyKey: "order-1", Key: "orders/1.bin"}},
	} {
		_, err := put(ctx, env, c.data, c.hdr)
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("%s under a used key: %v, want FailedPrecondition", c.name, err)
		}
		// Whoever learns a key must not learn from the refusal what to
		// state to be handed the first object.
		for _, recorded := range []string{e2e.HexSHA(a), first.GetKey(), "50000"} {
			if strings.Contains(status.Convert(err).Message(), recorded) {
				t.Fatalf("%s under a used key: the refusal %q quotes the recorded %q", c.name, status.Convert(err).Message(), recorded)
			}
		}
	}
	again, err := put(ctx, env, a, &uploadv1.UploadHeader{IdempotencyKey: "order-1", Key: "orders/1.bin", Sha256: e2e.HexSHA(a)})
	if err != nil || !again.GetReplayed() || again.GetKey() != first.GetKey() {
		t.Fatalf("the same object again: %v, %v; want a replay of %v", again, err, first)
	}

	// Racing uploads under one new key, half with other bytes: the bytes
	// of the upload that committed first get its result, the others fail.
	var wg sync.WaitGroup
	results := make([]*uploadv1.UploadResponse, 8)
	errs := make([]error, len(results))
	for i := range results {
		data := [][]byte{a, b}[i%2]
		wg.Go(func() {
			results[i], errs[i] = put(ctx, env, data, &uploadv1.UploadHeader{IdempotencyKey: "order-2", Sha256: e2e.HexSHA(data)})
		})
	}
	wg.Wait()
	var winner string
	for i, err := range errs {
		if err == nil {
			winner = results[i].GetSha256()
		}
	}
	if winner == "" {
		t.Fatalf("no racing upload succeeded: %v", errs)
	}
	for i, err := range errs {
		sent := e2e.HexSHA([][]byte{a, b}[i%2])
		switch {
		case sent == winner && (err != nil || results[i].GetSha256() != winner):
			t.Fatalf("racing upload %d sent the winning bytes: %v, %v", i, results[i], err)
		case sent != winner && status.Code(err) != codes.FailedPrecondition:
			t.Fatalf("racing upload %d sent other bytes: %v, %v; want FailedPrecondition", i, results[i], err)
		}
	}
	oneObjectPerKey(t, env, 2, int64(len(a)+len(b)))
}

// oneObjectPerKey fails the test unless the buckets hold exactly one object
// for each of keys idempotency keys, no open multipart upload, usage of
// exactly bytes in all, and (soon) no reservation.
func oneObjectPerKey(t *testing.T, env *e2e.Env, keys int, bytes int64) {
	t.Helper()
	objects, multiparts := env.ObjectCount(t)
	if objects != keys || multiparts != 0 {
		t.Fatalf("%d objects, %d open multipart uploads; want exactly %d objects (one per key)", objects, multiparts, keys)
	}
	used, reserved := env.Usage(t)
	if total := sum(used); total != bytes {
		t.Fatalf("usage %d, want %d (each key counted once)", total, bytes)
	}
	e2e.WaitNoReservations(t, env, reserved)
}

// Racing uploads under one idempotency key and one client-chosen object
// key, half with other bytes, retrying as uploadclient does: the object
// in the bucket holds exactly the bytes the key's record names, every
// racer with those bytes gets that result, every other racer gets
// FAILED_PRECONDITION, and the object is counted once. (Before uploads
// claimed the key, a loser's write could replace the winner's object.)
func TestRacingUploadsUnderOneObjectKey(t *testing.T) {
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	files := map[string][]byte{}
	for i, data := range [][]byte{e2e.RandomBytes(t, 50_000), e2e.RandomBytes(t, 50_000)} {
		path := filepath.Join(dir, fmt.Sprintf("%d.bin", i))
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		files[path] = data
	}
	paths := slices.Sorted(maps.Keys(files))
	results := make([]*uploadv1.UploadResponse, 8)
	errs := make([]error, len(results))
	var wg sync.WaitGroup
	for i := range results {
		wg.Go(func() {
			results[i], errs[i] = uploadclient.UploadFile(ctx, env.Upload, paths[i%2],
				&uploadv1.UploadHeader{Key: "orders/race.bin", IdempotencyKey: "order-race", ContentType: "application/octet-stream"},
				uploadclient.Options{Retries: 100})
		})
	}
	wg.Wait()
	var stored bytes.Buffer
	info, err := uploadclient.Get(ctx, env.Upload, &uploadv1.GetObjectRequest{BucketId: firstOK(t, results, errs).GetBucketId(), Key: "orders/race.bin"}, &stored, nil)
	if err != nil {
		t.Fatalf("read the raced key: %v", err)
	}
	winner := e2e.HexSHA(stored.Bytes())
	for i, err := range errs {
		sent := e2e.HexSHA(files[paths[i%2]])
		switch {
		case sent == winner && (err != nil || results[i].GetSha256() != winner):
			t.Fatalf("racer %d sent the stored bytes: %v, %v; want their result", i, results[i], err)
		case sent != winner && status.Code(err) != codes.FailedPrecondition:
			t.Fatalf("racer %d sent other bytes: %v, %v; want FAILED_PRECONDITION", i, results[i], err)
		}
	}
	if info.GetSha256() != winner {
		t.Fatalf("the object's stored sha256 %s is not its bytes' %s", info.GetSha256(), winner)
	}
	oneObjectPerKey(t, env, 1, int64(stored.Len()))
}

// firstOK returns the first successful result, failing the test if none.
func firstOK(t *testing.T, results []*uploadv1.UploadResponse, errs []error) *uploadv1.UploadResponse {
	t.Helper()
	for i, err := range errs {
		if err == nil {
			return results[i]
		}
	}
	t.Fatalf("no upload succeeded: %v", errs)
	return nil
}
