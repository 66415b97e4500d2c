package ledger_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// A commit's size is bounded by the bucket's limit even when its
// reservation is gone (nothing else bounds it then): concurrent commits
// of huge sizes for unknown reservations, which a batch adds up in one
// int64, are refused, and the bucket still holds only its limit.
func TestCommitSizesCannotOverflow(t *testing.T) {
	_, cli := testenv.Etcd(t)
	l, c := replicaCap(t, cli, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const limit = 1000
	bk := bucket("b1", limit)
	huge := int64(math.MaxInt64/2 + 1) // two of them wrap an int64
	for round := range 5 {
		var wg sync.WaitGroup
		for i := range 6 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := c.Commit(ctx, bk, fmt.Sprintf("a~gone%d-%d", round, i), huge, nil)
				if !errors.Is(err, ledger.ErrInvalid) {
					t.Errorf("commit of %d bytes for a vanished reservation: %v, want ErrInvalid", huge, err)
				}
			}()
		}
		wg.Wait()
	}
	if u := usage(t, l, "b1"); u.Used != 0 || u.Reserved != 0 {
		t.Fatalf("usage after refused commits: %+v, want none", u)
	}
	var total int64
	for range 3 {
		r, err := c.Reserve(ctx, bk, 400, time.Minute)
		if errors.Is(err, ledger.ErrNoRoom) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Commit(ctx, bk, r.ID, 400, nil); err != nil {
			t.Fatal(err)
		}
		total += 400
	}
	if total != 800 {
		t.Fatalf("committed %d bytes in 400-byte uploads on a %d-byte bucket, want 800", total, limit)
	}
}
