package ledger

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrClaimed: another upload holds the idempotency key.
var ErrClaimed = errors.New("another upload with this idempotency key is in progress")

// ErrRecorded: the idempotency key already has an upload record.
var ErrRecorded = errors.New("this idempotency key already has an upload record")

// ClaimError says until when another upload holds a key.
type ClaimError struct{ Until time.Time }

func (e *ClaimError) Error() string {
	return fmt.Sprintf("%v (until %s at the latest)", ErrClaimed, e.Until.UTC().Format(time.RFC3339))
}

func (e *ClaimError) Unwrap() error { return ErrClaimed }

// claimKey is where an upload holds an idempotency key while it runs.
func (l *Ledger) claimKey(k string) string {
	sum := sha256.Sum256([]byte(k))
	return l.opts.Prefix + "idemclaim/" + hex.EncodeToString(sum[:])
}

// checkClaim refuses a claim without a key, or with a token the claim's
// value "<token> <lapses, unix ns>" could not hold.
func checkClaim(key, token string) error {
	bad := token == "" || len(token) > 64 || strings.ContainsFunc(token, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-')
	})
	if key == "" || bad {
		return fmt.Errorf("%w: a claim needs an idempotency key and a token of 1 to 64 letters, digits, '-' or '_'", ErrInvalid)
	}
	return nil
}

func parseClaim(v []byte) (token string, until time.Time) {
	tok, exp, _ := strings.Cut(string(v), " ")
	ns, _ := strconv.ParseInt(exp, 10, 64) // unreadable: lapsed
	return tok, time.Unix(0, ns)
}

// Claim holds an idempotency key for the upload with token until ttl from
// now: taken when nobody holds it, renewed when token already does, taken
// over when another holder's claim lapsed (its upload died). It fails with
// ErrRecorded once the key has a record, and with a *ClaimError while
// another upload holds it. The claim key hangs on a lease only so that etcd
// removes it eventually; when it lapses is in its value, so that renewing
// a claim costs no lease grant.
func (c *Capacity) Claim(ctx context.Context, key, token string, ttl time.Duration) (time.Time, error) {
	if err := checkClaim(key, token); err != nil {
		return time.Time{}, err
	}
	// A key lives at least 4/5 of its lease's TTL after its last write
	// (see rotatingLease), longer than the claim itself.
	lease, err := c.claims.get(ctx, c.l, 2*ttl+time.Minute)
	if err != nil {
		return time.Time{}, err
	}
	rec, ck := c.l.idemKey(key), c.l.claimKey(key)
	var seen int64 // mod revision of the claim we may replace (0: none)
	for attempt := 0; attempt < 10; attempt++ {
		until := c.l.opts.Now().Add(ttl)
		val := token + " " + strconv.FormatInt(until.UnixNano(), 10)
		tctx, cancel := c.l.ctx(ctx)
		resp, err := c.l.cli.Txn(tctx).If(
			clientv3.Compare(clientv3.CreateRevision(rec), "=", 0),
			clientv3.Compare(clientv3.ModRevision(ck), "=", seen),
		).Then(clientv3.OpPut(ck, val, clientv3.WithLease(lease))).Else(clientv3.OpGet(rec, clientv3.WithCountOnly()), clientv3.OpGet(ck)).Commit()
		cancel()
		c.noteLease(err)
		if err != nil {
			// Ambiguous: the caller's EndClaim with the same token removes
			// a claim that did apply.
			return time.Time{}, fmt.Errorf("ledger: claim idempotency key: %w", err)
		}
		if resp.Succeeded {
			return until, nil
		}
		if resp.Responses[0].GetResponseRange().Count > 0 {
			return time.Time{}, ErrRecorded
		}
		seen = 0
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
			holder, lapses := parseClaim(kvs[0].Value)
			if holder != token && c.l.opts.Now().Before(lapses) {
				return time.Time{}, &ClaimError{Until: lapses}
			}
			seen = kvs[0].ModRevision
		}
	}
	return time.Time{}, ErrConflict
}

// EndClaim removes the claim on key if token holds it. Absent claims and
// claims under another token are left alone.
func (c *Capacity) EndClaim(ctx context.Context, key, token string) error {
	if err := checkClaim(key, token); err != nil {
		return err
	}
	ck := c.l.claimKey(key)
	tctx, cancel := c.l.ctx(ctx)
	defer cancel()
	resp, err := c.l.cli.Get(tctx, ck)
	if err != nil {
		return fmt.Errorf("ledger: read idempotency claim: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	if holder, _ := parseClaim(resp.Kvs[0].Value); holder != token {
		return nil
	}
	if _, err := c.l.cli.Txn(tctx).If(clientv3.Compare(clientv3.ModRevision(ck), "=", resp.Kvs[0].ModRevision)).Then(clientv3.OpDelete(ck)).Commit(); err != nil {
		return fmt.Errorf("ledger: end idempotency claim: %w", err)
	}
	return nil
}
