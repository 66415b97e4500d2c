package devstack_test

import (
	"context"
	"sync"
	"testing"
	"time"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
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
	objects, multiparts := env.ObjectCount(t)
	if objects != 2 || multiparts != 0 {
		t.Fatalf("%d objects, %d open multipart uploads; want exactly 2 objects (one per key)", objects, multiparts)
	}
	used, reserved := env.Usage(t)
	total := int64(0)
	for _, u := range used {
		total += u
	}
	if total != 2*int64(len(data)) {
		t.Fatalf("usage %d, want %d (each key counted once)", total, 2*len(data))
	}
	e2e.WaitNoReservations(t, env, reserved)
}
