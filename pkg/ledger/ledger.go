package ledger

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
)

// Options configure a Ledger.
type Options struct {
	// Prefix of every key; default "/bucketlb/".
	Prefix string
	// ResetDay is the UTC day of month usage resets (1–28); default 1.
	ResetDay int
	// Now is the clock; default time.Now. Tests inject their own.
	Now func() time.Time
	// OpTimeout bounds each etcd call (the client otherwise waits for
	// etcd indefinitely); default 2s.
	OpTimeout time.Duration
	// CommitMarkerTTL is how long commit markers are kept to answer
	// retried commits; default 48h.
	CommitMarkerTTL time.Duration
}

// Ledger is the etcd-backed capacity ledger.
type Ledger struct {
	cli  *clientv3.Client
	opts Options
}

// New returns a ledger over cli.
func New(cli *clientv3.Client, opts Options) *Ledger {
	if opts.Prefix == "" {
		opts.Prefix = "/bucketlb/"
	}
	if opts.ResetDay == 0 {
		opts.ResetDay = 1
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.OpTimeout == 0 {
		opts.OpTimeout = 2 * time.Second
	}
	if opts.CommitMarkerTTL == 0 {
		opts.CommitMarkerTTL = 48 * time.Hour
	}
	return &Ledger{cli: cli, opts: opts}
}

// Period returns the current usage period.
func (l *Ledger) Period() Period { return PeriodAt(l.opts.Now(), l.opts.ResetDay) }

func (l *Ledger) bucketKey(id string) string { return l.opts.Prefix + "buckets/" + id }
func (l *Ledger) bucketsPrefix() string      { return l.opts.Prefix + "buckets/" }
func (l *Ledger) seededKey() string          { return l.opts.Prefix + "seeded" }
func (l *Ledger) usageKey(period, bucket string) string {
	return l.opts.Prefix + "usage/" + period + "/" + bucket
}
func (l *Ledger) usagePrefix(period string) string { return l.opts.Prefix + "usage/" + period + "/" }
func (l *Ledger) resPrefix(bucket string) string   { return l.opts.Prefix + "res/" + bucket + "/" }
func (l *Ledger) resKey(bucket, id string) string  { return l.resPrefix(bucket) + id }
func (l *Ledger) commitKey(id string) string       { return l.opts.Prefix + "commits/" + id }

// idemKey hashes the client's key: any bytes, bounded length.
func (l *Ledger) idemKey(k string) string {
	sum := sha256.Sum256([]byte(k))
	return l.opts.Prefix + "idem/" + hex.EncodeToString(sum[:])
}

// Prefix returns the key prefix (for tests replaying history).
func (l *Ledger) Prefix() string { return l.opts.Prefix }

func (l *Ledger) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, l.opts.OpTimeout)
}

// ---- buckets ----

// PutBucket creates or replaces a bucket spec.
func (l *Ledger) PutBucket(ctx context.Context, spec *adminv1.BucketSpec) error {
	data, err := protojson.Marshal(spec)
	if err != nil {
		return fmt.Errorf("ledger: encode bucket: %w", err)
	}
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	if _, err := l.cli.Put(ctx, l.bucketKey(spec.GetId()), string(data)); err != nil {
		return fmt.Errorf("ledger: put bucket %s: %w", spec.GetId(), err)
	}
	return nil
}

// UpdateBucket applies fn to the stored spec with compare-and-swap.
func (l *Ledger) UpdateBucket(ctx context.Context, id string, fn func(*adminv1.BucketSpec)) (*adminv1.BucketSpec, error) {
	for attempt := 0; attempt < 20; attempt++ {
		spec, rev, err := l.getBucket(ctx, id)
		if err != nil {
			return nil, err
		}
		fn(spec)
		data, err := protojson.Marshal(spec)
		if err != nil {
			return nil, err
		}
		cctx, cancel := l.ctx(ctx)
		resp, err := l.cli.Txn(cctx).If(clientv3.Compare(clientv3.ModRevision(l.bucketKey(id)), "=", rev)).
			Then(clientv3.OpPut(l.bucketKey(id), string(data))).Commit()
		cancel()
		if err != nil {
			return nil, fmt.Errorf("ledger: update bucket %s: %w", id, err)
		}
		if resp.Succeeded {
			return spec, nil
		}
	}
	return nil, ErrConflict
}

// DeleteBucket removes a spec; ErrBucketNotFound if absent.
func (l *Ledger) DeleteBucket(ctx context.Context, id string) error {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Delete(ctx, l.bucketKey(id))
	if err != nil {
		return fmt.Errorf("ledger: delete bucket %s: %w", id, err)
	}
	if resp.Deleted == 0 {
		return fmt.Errorf("%w: %q", ErrBucketNotFound, id)
	}
	return nil
}

// GetBucket returns one spec.
func (l *Ledger) GetBucket(ctx context.Context, id string) (*adminv1.BucketSpec, error) {
	spec, _, err := l.getBucket(ctx, id)
	return spec, err
}

func (l *Ledger) getBucket(ctx context.Context, id string) (*adminv1.BucketSpec, int64, error) {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Get(ctx, l.bucketKey(id))
	if err != nil {
		return nil, 0, fmt.Errorf("ledger: get bucket %s: %w", id, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, fmt.Errorf("%w: %q", ErrBucketNotFound, id)
	}
	spec := &adminv1.BucketSpec{}
	if err := protojson.Unmarshal(resp.Kvs[0].Value, spec); err != nil {
		return nil, 0, fmt.Errorf("ledger: decode bucket %s: %w", id, err)
	}
	return spec, resp.Kvs[0].ModRevision, nil
}

// ListBuckets returns every spec ordered by id, and the revision read at.
func (l *Ledger) ListBuckets(ctx context.Context) ([]*adminv1.BucketSpec, int64, error) {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Get(ctx, l.bucketsPrefix(), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, 0, fmt.Errorf("ledger: list buckets: %w", err)
	}
	out := make([]*adminv1.BucketSpec, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		spec := &adminv1.BucketSpec{}
		if err := protojson.Unmarshal(kv.Value, spec); err != nil {
			return nil, 0, fmt.Errorf("ledger: decode %s: %w", kv.Key, err)
		}
		out = append(out, spec)
	}
	return out, resp.Header.Revision, nil
}

// SeedBuckets writes the configured buckets once per cluster: after the
// first seeding, etcd (changed through the admin API) is the source of
// truth and later calls do nothing. Reports whether it wrote.
func (l *Ledger) SeedBuckets(ctx context.Context, specs []*adminv1.BucketSpec) (bool, error) {
	ops := []clientv3.Op{clientv3.OpPut(l.seededKey(), l.opts.Now().UTC().Format(time.RFC3339))}
	for _, s := range specs {
		data, err := protojson.Marshal(s)
		if err != nil {
			return false, err
		}
		ops = append(ops, clientv3.OpPut(l.bucketKey(s.GetId()), string(data)))
	}
	if len(ops) > 128 {
		return false, fmt.Errorf("ledger: %d buckets exceed etcd's 127 per seeding transaction", len(specs))
	}
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(l.seededKey()), "=", 0)).Then(ops...).Commit()
	if err != nil {
		return false, fmt.Errorf("ledger: seed buckets: %w", err)
	}
	return resp.Succeeded, nil
}

// WatchBuckets calls fn with the full, fresh bucket list at start and
// after every change until ctx ends. A compacted watch re-reads and
// re-watches from the new revision.
func (l *Ledger) WatchBuckets(ctx context.Context, fn func([]*adminv1.BucketSpec)) error {
	for ctx.Err() == nil {
		specs, rev, err := l.ListBuckets(ctx)
		if err != nil {
			// etcd unreachable: keep serving the last known list and retry.
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(500 * time.Millisecond):
			}
			continue
		}
		fn(specs)
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		ch := l.cli.Watch(wctx, l.bucketsPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		for wr := range ch {
			if wr.Err() != nil {
				break // compacted or lost leader: re-list
			}
			specs, _, err := l.ListBuckets(ctx)
			if err != nil {
				break
			}
			fn(specs)
		}
		cancel()
	}
	return nil
}

// ---- capacity ----

// Reservation is granted capacity.
type Reservation struct {
	ID        string
	BucketID  string
	Size      int64
	Period    string
	LeaseID   clientv3.LeaseID
	ExpiresAt time.Time
}

type resValue struct {
	Size int64 `json:"size"`
}

// CommitResult is the recorded outcome of a commit.
type CommitResult struct {
	Period           string `json:"period"`
	Size             int64  `json:"size"`
	UsedAfter        int64  `json:"used_after"`
	AlreadyCommitted bool   `json:"-"`
	// DuplicateOf is set when another commit recorded the same idempotency
	// key first; this one was not applied.
	DuplicateOf []byte `json:"-"`
}

// Idempotency ties a commit to a client's idempotency key: Record (the
// upload's result) is stored with the usage in one transaction, and a
// second commit under the same key is refused with the first record.
type Idempotency struct {
	Key    string
	Record []byte
}

// UploadRecord returns the record stored for an idempotency key.
func (l *Ledger) UploadRecord(ctx context.Context, key string) ([]byte, bool, error) {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Get(ctx, l.idemKey(key))
	if err != nil {
		return nil, false, fmt.Errorf("ledger: read idempotency record: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return nil, false, nil
	}
	return resp.Kvs[0].Value, true, nil
}

// NewReservationID returns a random id that is safe in keys.
func NewReservationID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// capacityState is a bucket's accounting read at one revision.
type capacityState struct {
	rev       int64
	usageRev  int64 // mod revision of the usage key, 0 if absent
	used      int64
	reserved  int64
	resExists bool // the reservation being renewed/committed is live
	resSize   int64
}

func (l *Ledger) readState(ctx context.Context, bucket, period, resID string) (capacityState, error) {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	// Two reads in one transaction see the same revision.
	resp, err := l.cli.Txn(ctx).Then(
		clientv3.OpGet(l.usageKey(period, bucket)),
		clientv3.OpGet(l.resPrefix(bucket), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return capacityState{}, fmt.Errorf("ledger: read capacity of %s: %w", bucket, err)
	}
	st := capacityState{rev: resp.Header.Revision}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		st.usageRev = kvs[0].ModRevision
		st.used, _ = strconv.ParseInt(string(kvs[0].Value), 10, 64)
	}
	myKey := l.resKey(bucket, resID)
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		var v resValue
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			continue
		}
		st.reserved += v.Size
		if resID != "" && string(kv.Key) == myKey {
			st.resExists, st.resSize = true, v.Size
		}
	}
	return st, nil
}

// guard returns compares that fail if the usage key or any reservation of
// the bucket changed after st was read. Deleted reservations only free
// capacity, so they need not fail the compare — and a prefix compare does
// not see them — which is safe.
func (l *Ledger) guard(bucket, period string, st capacityState) []clientv3.Cmp {
	return []clientv3.Cmp{
		clientv3.Compare(clientv3.ModRevision(l.usageKey(period, bucket)), "=", st.usageRev),
		clientv3.Compare(clientv3.ModRevision(l.resPrefix(bucket)).WithPrefix(), "<", st.rev+1),
	}
}

// Reserve grants size bytes on bucket for ttl. ErrNoRoom when the bucket
// cannot hold them.
func (l *Ledger) Reserve(ctx context.Context, bucket *adminv1.BucketSpec, size int64, ttl time.Duration) (*Reservation, error) {
	return l.reserve(ctx, bucket, NewReservationID(), size, ttl)
}

func (l *Ledger) grant(ctx context.Context, ttl time.Duration) (clientv3.LeaseID, error) {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	secs := int64(math.Ceil(ttl.Seconds()))
	if secs < 1 {
		secs = 1
	}
	lease, err := l.cli.Grant(ctx, secs)
	if err != nil {
		return 0, fmt.Errorf("ledger: grant lease: %w", err)
	}
	return lease.ID, nil
}

func (l *Ledger) revoke(ctx context.Context, id clientv3.LeaseID) {
	ctx, cancel := l.ctx(context.WithoutCancel(ctx))
	defer cancel()
	_, _ = l.cli.Revoke(ctx, id) // best effort: the lease expires anyway
}

func (l *Ledger) reserve(ctx context.Context, bucket *adminv1.BucketSpec, id string, size int64, ttl time.Duration) (*Reservation, error) {
	if size <= 0 {
		return nil, fmt.Errorf("%w: size must be positive", ErrInvalid)
	}
	limit := bucket.GetMonthlyLimitBytes()
	if size > limit {
		return nil, ErrNoRoom
	}
	period := l.Period().Name
	lease, err := l.grant(ctx, ttl)
	if err != nil {
		return nil, err
	}
	val, _ := json.Marshal(resValue{Size: size})
	err = l.retry(ctx, func() (bool, error) {
		st, err := l.readState(ctx, bucket.GetId(), period, "")
		if err != nil {
			return false, err
		}
		if st.used+st.reserved+size > limit {
			return false, ErrNoRoom
		}
		cctx, cancel := l.ctx(ctx)
		defer cancel()
		resp, err := l.cli.Txn(cctx).If(l.guard(bucket.GetId(), period, st)...).
			Then(clientv3.OpPut(l.resKey(bucket.GetId(), id), string(val), clientv3.WithLease(lease))).Commit()
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			// Contention outlasted a short TTL: start over with a new lease.
			if lease, err = l.grant(ctx, ttl); err != nil {
				return false, err
			}
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("ledger: write reservation: %w", err)
		}
		return resp.Succeeded, nil
	})
	if err != nil {
		l.revoke(ctx, lease)
		return nil, err
	}
	return &Reservation{ID: id, BucketID: bucket.GetId(), Size: size, Period: period, LeaseID: lease, ExpiresAt: l.opts.Now().Add(ttl)}, nil
}

// retry runs an optimistic step until it succeeds, fails, or ctx ends.
func (l *Ledger) retry(ctx context.Context, step func() (bool, error)) error {
	backoff := time.Millisecond
	for attempt := 0; ; attempt++ {
		ok, err := step()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if attempt >= 200 {
			return ErrConflict
		}
		// Jitter spreads replicas that collided on the same keys.
		d := backoff/2 + time.Duration(mrand.Int64N(int64(backoff)))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
		if backoff < 50*time.Millisecond {
			backoff *= 2
		}
	}
}

// Renew extends a reservation by ttl. If it vanished (its lease expired,
// e.g. because the granting replica or the holder stalled), it is granted
// again against current capacity, or ErrReservationLost.
func (l *Ledger) Renew(ctx context.Context, bucket *adminv1.BucketSpec, resID string, size int64, ttl time.Duration) (time.Time, bool, error) {
	if resID == "" || size <= 0 {
		return time.Time{}, false, fmt.Errorf("%w: reservation id and reserved bytes are required", ErrInvalid)
	}
	cctx, cancel := l.ctx(ctx)
	resp, err := l.cli.Get(cctx, l.resKey(bucket.GetId(), resID))
	cancel()
	if err != nil {
		return time.Time{}, false, fmt.Errorf("ledger: read reservation: %w", err)
	}
	if len(resp.Kvs) > 0 && resp.Kvs[0].Lease != 0 {
		cctx, cancel := l.ctx(ctx)
		_, err := l.cli.KeepAliveOnce(cctx, clientv3.LeaseID(resp.Kvs[0].Lease))
		cancel()
		if err == nil {
			return l.opts.Now().Add(ttl), false, nil
		}
		// Lease gone between read and keepalive: fall through.
	}
	res, err := l.reserve(ctx, bucket, resID, size, ttl)
	if errors.Is(err, ErrNoRoom) {
		return time.Time{}, false, ErrReservationLost
	}
	if err != nil {
		return time.Time{}, false, err
	}
	return res.ExpiresAt, true, nil
}

// Commit records actual bytes for a reservation and ends it, exactly
// once: a repeated call returns the first answer. When the reservation
// has lapsed, the bytes are committed only if the bucket still has room
// for them, checked in the same transaction; otherwise ErrReservationLost
// and nothing is recorded.
func (l *Ledger) Commit(ctx context.Context, bucket *adminv1.BucketSpec, resID string, actual int64, idem *Idempotency) (CommitResult, error) {
	if resID == "" || actual < 0 {
		return CommitResult{}, fmt.Errorf("%w: reservation id and a non-negative size are required", ErrInvalid)
	}
	period := l.Period().Name
	id := bucket.GetId()
	var out CommitResult
	lease, err := l.grant(ctx, l.opts.CommitMarkerTTL)
	if err != nil {
		return out, err
	}
	err = l.retry(ctx, func() (bool, error) {
		if prev, ok, err := l.readMarker(ctx, resID); err != nil || ok {
			out = prev
			out.AlreadyCommitted = ok
			return ok, err
		}
		st, err := l.readState(ctx, id, period, resID)
		if err != nil {
			return false, err
		}
		cmps := []clientv3.Cmp{
			clientv3.Compare(clientv3.CreateRevision(l.commitKey(resID)), "=", 0),
			clientv3.Compare(clientv3.ModRevision(l.usageKey(period, id)), "=", st.usageRev),
		}
		if st.resExists {
			if actual > st.resSize {
				return false, fmt.Errorf("%w: committed %d bytes exceed the %d reserved", ErrInvalid, actual, st.resSize)
			}
			// The reservation must still exist when the txn applies.
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(l.resKey(id, resID)), ">", 0))
		} else {
			// Lapsed: re-establish and commit in one step, only with room.
			if st.used+st.reserved+actual > bucket.GetMonthlyLimitBytes() {
				return false, ErrReservationLost
			}
			cmps = l.guard(id, period, st)
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(l.commitKey(resID)), "=", 0))
		}
		res := CommitResult{Period: period, Size: actual, UsedAfter: st.used + actual}
		marker, _ := json.Marshal(res)
		ops := []clientv3.Op{
			clientv3.OpPut(l.usageKey(period, id), strconv.FormatInt(st.used+actual, 10)),
			clientv3.OpDelete(l.resKey(id, resID)),
			clientv3.OpPut(l.commitKey(resID), string(marker), clientv3.WithLease(lease)),
		}
		var elseOps []clientv3.Op
		if idem != nil && idem.Key != "" {
			k := l.idemKey(idem.Key)
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
			ops = append(ops, clientv3.OpPut(k, string(idem.Record), clientv3.WithLease(lease)))
			elseOps = append(elseOps, clientv3.OpGet(k))
		}
		cctx, cancel := l.ctx(ctx)
		defer cancel()
		resp, err := l.cli.Txn(cctx).If(cmps...).Then(ops...).Else(elseOps...).Commit()
		if err != nil {
			// Ambiguous: the next attempt reads the marker if it applied.
			return false, fmt.Errorf("ledger: commit: %w", err)
		}
		if resp.Succeeded {
			out = res
			return true, nil
		}
		if len(elseOps) > 0 {
			if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
				// Another upload under this key won; ours must not count.
				// (Our own earlier attempt would have left its marker.)
				if _, mine, err := l.readMarker(ctx, resID); err == nil && !mine {
					out = CommitResult{DuplicateOf: kvs[0].Value}
					return true, nil
				}
			}
		}
		return false, nil
	})
	if err != nil || out.AlreadyCommitted || out.DuplicateOf != nil {
		l.revoke(ctx, lease)
	}
	return out, err
}

func (l *Ledger) readMarker(ctx context.Context, resID string) (CommitResult, bool, error) {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Get(ctx, l.commitKey(resID))
	if err != nil {
		return CommitResult{}, false, fmt.Errorf("ledger: read commit marker: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return CommitResult{}, false, nil
	}
	var r CommitResult
	if err := json.Unmarshal(resp.Kvs[0].Value, &r); err != nil {
		return CommitResult{}, false, fmt.Errorf("ledger: decode commit marker: %w", err)
	}
	return r, true, nil
}

// Release ends a reservation without usage. Releasing an absent
// reservation succeeds.
func (l *Ledger) Release(ctx context.Context, bucketID, resID string) error {
	if resID == "" {
		return fmt.Errorf("%w: reservation id is required", ErrInvalid)
	}
	cctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Get(cctx, l.resKey(bucketID, resID))
	if err != nil {
		return fmt.Errorf("ledger: release: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	if lease := clientv3.LeaseID(resp.Kvs[0].Lease); lease != 0 {
		if _, err := l.cli.Revoke(cctx, lease); err == nil {
			return nil
		}
	}
	if _, err := l.cli.Delete(cctx, l.resKey(bucketID, resID)); err != nil {
		return fmt.Errorf("ledger: release: %w", err)
	}
	return nil
}

// Usage is one bucket's accounting in a period.
type Usage struct {
	Used, Reserved int64
	Reservations   int
}

// Usages returns usage and live reservations of every bucket in the
// current period, read at one revision.
func (l *Ledger) Usages(ctx context.Context) (map[string]Usage, Period, error) {
	p := l.Period()
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Txn(ctx).Then(
		clientv3.OpGet(l.usagePrefix(p.Name), clientv3.WithPrefix()),
		clientv3.OpGet(l.opts.Prefix+"res/", clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, p, fmt.Errorf("ledger: read usage: %w", err)
	}
	out := map[string]Usage{}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		b := strings.TrimPrefix(string(kv.Key), l.usagePrefix(p.Name))
		u := out[b]
		u.Used, _ = strconv.ParseInt(string(kv.Value), 10, 64)
		out[b] = u
	}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		rest := strings.TrimPrefix(string(kv.Key), l.opts.Prefix+"res/")
		b, _, _ := strings.Cut(rest, "/")
		var v resValue
		if json.Unmarshal(kv.Value, &v) == nil {
			u := out[b]
			u.Reserved += v.Size
			u.Reservations++
			out[b] = u
		}
	}
	return out, p, nil
}

// SetUsage sets a bucket's committed usage for the current period and
// returns the previous value (admin reset and correction).
func (l *Ledger) SetUsage(ctx context.Context, bucketID string, used int64) (int64, error) {
	if used < 0 {
		return 0, fmt.Errorf("%w: usage cannot be negative", ErrInvalid)
	}
	period := l.Period().Name
	var prev int64
	err := l.retry(ctx, func() (bool, error) {
		st, err := l.readState(ctx, bucketID, period, "")
		if err != nil {
			return false, err
		}
		prev = st.used
		cctx, cancel := l.ctx(ctx)
		defer cancel()
		resp, err := l.cli.Txn(cctx).
			If(clientv3.Compare(clientv3.ModRevision(l.usageKey(period, bucketID)), "=", st.usageRev)).
			Then(clientv3.OpPut(l.usageKey(period, bucketID), strconv.FormatInt(used, 10))).Commit()
		if err != nil {
			return false, fmt.Errorf("ledger: set usage: %w", err)
		}
		return resp.Succeeded, nil
	})
	return prev, err
}
