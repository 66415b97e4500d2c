package ledger_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// An idempotency key is held by one upload at a time: a second token is
// refused (with when the claim lapses) until the holder ends its claim or
// the claim lapses unrenewed; renewing keeps it; EndClaim by a token that
// does not hold the key changes nothing; once the key has a record, no
// claim is granted. Two replicas see the same claims.
func TestIdempotencyClaims(t *testing.T) {
	_, cli := testenv.Etcd(t)
	var offset atomic.Int64 // the injected clock runs ahead by this much
	now := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	_, c1 := replicaCapWith(t, cli, "r1", ledger.Options{Now: now})
	_, c2 := replicaCapWith(t, cli, "r2", ledger.Options{Now: now})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const ttl = 30 * time.Second
	refused := func(c *ledger.Capacity, token string) *ledger.ClaimError {
		t.Helper()
		_, err := c.Claim(ctx, "k", token, ttl)
		var ce *ledger.ClaimError
		if !errors.As(err, &ce) || !errors.Is(err, ledger.ErrClaimed) {
			t.Fatalf("claim by %s while another token holds the key: %v, want a ClaimError", token, err)
		}
		return ce
	}
	until, err := c1.Claim(ctx, "k", "upload-a", ttl)
	if err != nil {
		t.Fatal(err)
	}
	if ce := refused(c2, "upload-b"); !ce.Until.Equal(until) {
		t.Fatalf("refusal says the claim lapses at %v, want %v", ce.Until, until)
	}
	// The holder renews through the other replica, as after a failover.
	offset.Add(int64(20 * time.Second))
	if renewed, err := c2.Claim(ctx, "k", "upload-a", ttl); err != nil || !renewed.After(until) {
		t.Fatalf("renewal = %v, %v; want a later lapse than %v", renewed, err, until)
	}
	offset.Add(int64(20 * time.Second)) // past the first lapse, not the renewed one
	refused(c1, "upload-b")
	if err := c1.EndClaim(ctx, "k", "upload-b"); err != nil {
		t.Fatal(err)
	}
	refused(c1, "upload-b")

	// Unrenewed, the claim lapses and another upload takes the key over.
	offset.Add(int64(ttl))
	if _, err := c1.Claim(ctx, "k", "upload-b", ttl); err != nil {
		t.Fatalf("claim after the holder's lapsed: %v", err)
	}
	refused(c2, "upload-a")
	// Ended by its holder, the key is free at once.
	if err := c2.EndClaim(ctx, "k", "upload-b"); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Claim(ctx, "k", "upload-c", ttl); err != nil {
		t.Fatalf("claim after the holder ended its claim: %v", err)
	}

	// A recorded key takes no claim, not even its holder's renewal.
	b := bucket("b1", 1000)
	r, err := c1.Reserve(ctx, b, 100, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c1.Commit(ctx, b, r.ID, 100, &ledger.Idempotency{Key: "k", Record: []byte(`{"size":100}`)}); err != nil {
		t.Fatal(err)
	}
	for _, token := range []string{"upload-c", "upload-d"} {
		if _, err := c2.Claim(ctx, "k", token, ttl); !errors.Is(err, ledger.ErrRecorded) {
			t.Fatalf("claim by %s of a recorded key: %v, want ErrRecorded", token, err)
		}
	}
	for _, bad := range []struct{ key, token string }{{"", "t"}, {"k", ""}, {"k", "has space"}, {"k", string(make([]byte, 65))}} {
		if _, err := c1.Claim(ctx, bad.key, bad.token, ttl); !errors.Is(err, ledger.ErrInvalid) {
			t.Fatalf("claim(%q, %q): %v, want ErrInvalid", bad.key, bad.token, err)
		}
	}
}
