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
	"sync/atomic"
	"time"

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
	// retried commits; default 1h. etcd holds about commit rate × TTL
	// markers (100 commits/s for 48 h would be 17 million keys, past its
	// storage quota), and a commit is retried within seconds.
	CommitMarkerTTL time.Duration
	// IdempotencyTTL is how long an upload's result is kept for its
	// idempotency key; default 24h. Only uploads that carry a key cost one.
	IdempotencyTTL time.Duration
}

// Ledger is the etcd-backed capacity ledger.
type Ledger struct {
	cli  *clientv3.Client
	opts Options
	// period caches the current period: every reservation and commit
	// needs its name, and formatting dates showed up in profiles.
	period atomic.Pointer[Period]
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
		opts.CommitMarkerTTL = time.Hour
	}
	if opts.IdempotencyTTL == 0 {
		opts.IdempotencyTTL = 24 * time.Hour
	}
	return &Ledger{cli: cli, opts: opts}
}

// Period returns the current usage period.
func (l *Ledger) Period() Period {
	now := l.opts.Now()
	// The ledger turns a turnMargin early: commits, usage, status and
	// corrections in a period's last minute are the next period's.
	if p := l.period.Load(); p != nil && !now.Before(p.Start.Add(-turnMargin)) && now.Before(p.End.Add(-turnMargin)) {
		return *p
	}
	p := PeriodAt(now.Add(turnMargin), l.opts.ResetDay)
	l.period.Store(&p)
	return p
}

// turnMargin is how far apart the replicas' clocks may be around the turn
// of a period without either period's usage passing a bucket's limit.
// Without it, a replica already in the new period grew its block within
// the new period's room, and one still in the old counted what it carved
// there against the old, full period. So the ledger turns a turnMargin
// before the period's end (a replica behind still counts in the old
// period, one ahead already in the new), and a block grows in the
// period's last two turnMargins only within the room both periods leave:
// every grow that either kind of commit could meet checks the period it
// counts in.
const turnMargin = time.Minute

// turnAt returns, for the time now, the period commits count in and the
// periods whose room a block's growth must stay within (see turnMargin).
func (l *Ledger) turnAt(now time.Time) (commit Period, room []Period) {
	commit = PeriodAt(now.Add(turnMargin), l.opts.ResetDay)
	cal := PeriodAt(now, l.opts.ResetDay)
	if now.Before(cal.End.Add(-2 * turnMargin)) {
		return commit, []Period{cal}
	}
	return commit, []Period{cal, PeriodAt(cal.End, l.opts.ResetDay)}
}

// AgreeResetDay records this replica's period reset day as the
// cluster's, the first time, and fails with ErrResetDayMismatch when the
// cluster already counts from another day. Usage is kept per period name,
// which the reset day makes: replicas on different days would each grant
// a bucket's whole limit in periods of their own, and a replica moved to
// another day would start its period with no usage at all.
func (l *Ledger) AgreeResetDay(ctx context.Context) error {
	key := l.opts.Prefix + "periodresetday"
	day := strconv.Itoa(l.opts.ResetDay)
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, day)).Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return fmt.Errorf("ledger: read the period reset day: %w", err)
	}
	if resp.Succeeded {
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 1 && string(kvs[0].Value) != day {
		return fmt.Errorf("%w: this replica resets usage on day %s of the month, the cluster on day %s (etcd key %s); every allocator must use the same day. To move the cluster to another day, stop every allocator, delete that key, start them with the new day, and correct each bucket's usage for the new period (CorrectUsage)",
			ErrResetDayMismatch, day, kvs[0].Value, key)
	}
	return nil
}

func (l *Ledger) bucketKey(id string) string { return l.opts.Prefix + "buckets/" + id }
func (l *Ledger) bucketsPrefix() string      { return l.opts.Prefix + "buckets/" }
func (l *Ledger) seededKey() string          { return l.opts.Prefix + "seeded" }
func (l *Ledger) usageKey(period, bucket string) string {
	return l.opts.Prefix + "usage/" + period + "/" + bucket
}
func (l *Ledger) usagePrefix(period string) string { return l.opts.Prefix + "usage/" + period + "/" }
func (l *Ledger) commitKey(id string) string       { return l.opts.Prefix + "commits/" + id }

// Reservation keys are grouped by the term that carved them, so each
// replica watches only its own reservations instead of every replica
// receiving every reservation of the hot bucket. The id names its owner
// ("<owner>~<random>"), so any replica finds the key from bucket and id.
func (l *Ledger) ownerResPrefix(owner string) string { return l.opts.Prefix + "cap/res/" + owner + "/" }
func (l *Ledger) resKey(bucket, id string) string {
	owner, rnd, ok := strings.Cut(id, "~")
	if !ok {
		owner, rnd = "-", id
	}
	return l.ownerResPrefix(owner) + bucket + "/" + rnd
}

// ownerOf returns the term that carved reservation id ("" if it names none).
func ownerOf(id string) string {
	owner, _, ok := strings.Cut(id, "~")
	if !ok {
		return ""
	}
	return owner
}

// validID reports whether a reservation id from a caller can be used in a
// key: ids this package makes, or any short run of key-safe characters.
func validID(id string) bool {
	if id == "" || len(id) > 256 {
		return false
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' || r == '~') {
			return false
		}
	}
	return strings.Count(id, "~") <= 1
}

// keySafe maps a replica id to characters that cannot be confused with the
// separators of reservation ids and keys.
func keySafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' {
			return r
		}
		return '_'
	}, s)
}

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

// StoreBucket stores the spec build makes from the stored one (nil when
// id has none), with compare-and-swap: what build kept of the stored spec
// (its state, say) is what the bucket has when the write applies, however
// other writes interleave. An error from build is returned as is.
func (l *Ledger) StoreBucket(ctx context.Context, id string, build func(cur *adminv1.BucketSpec) (*adminv1.BucketSpec, error)) (*adminv1.BucketSpec, error) {
	key := l.bucketKey(id)
	for attempt := 0; attempt < 20; attempt++ {
		cur, rev, err := l.getBucket(ctx, id)
		if err != nil && !errors.Is(err, ErrBucketNotFound) {
			return nil, err
		}
		spec, err := build(cur)
		if err != nil {
			return nil, err
		}
		if spec.GetId() != id {
			return nil, fmt.Errorf("%w: a spec stored under %q must have that id, not %q", ErrInvalid, id, spec.GetId())
		}
		data, err := protojson.Marshal(spec)
		if err != nil {
			return nil, fmt.Errorf("ledger: encode bucket: %w", err)
		}
		cctx, cancel := l.ctx(ctx)
		// rev is 0 for a bucket read absent: its key must still be absent.
		resp, err := l.cli.Txn(cctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, string(data))).Commit()
		cancel()
		if err != nil {
			return nil, fmt.Errorf("ledger: put bucket %s: %w", id, err)
		}
		if resp.Succeeded {
			return spec, nil
		}
	}
	return nil, ErrConflict
}

// UpdateBucket applies fn to the stored spec with compare-and-swap;
// ErrBucketNotFound if id has none.
func (l *Ledger) UpdateBucket(ctx context.Context, id string, fn func(*adminv1.BucketSpec)) (*adminv1.BucketSpec, error) {
	return l.StoreBucket(ctx, id, func(cur *adminv1.BucketSpec) (*adminv1.BucketSpec, error) {
		if cur == nil {
			return nil, fmt.Errorf("%w: %q", ErrBucketNotFound, id)
		}
		fn(cur)
		return cur, nil
	})
}

// DeleteBucket removes a spec; ErrBucketNotFound if absent. The delete is
// compared on the spec it read: one whose answer was lost and that
// applies late must not remove a spec an operator wrote after it.
func (l *Ledger) DeleteBucket(ctx context.Context, id string) error {
	key := l.bucketKey(id)
	for attempt := 0; attempt < 10; attempt++ {
		gctx, cancel := l.ctx(ctx)
		got, err := l.cli.Get(gctx, key)
		cancel()
		if err != nil {
			return fmt.Errorf("ledger: read bucket %s: %w", id, err)
		}
		if len(got.Kvs) == 0 {
			return fmt.Errorf("%w: %q", ErrBucketNotFound, id)
		}
		tctx, cancel := l.ctx(ctx)
		resp, err := l.cli.Txn(tctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", got.Kvs[0].ModRevision)).
			Then(clientv3.OpDelete(key)).Commit()
		cancel()
		if err != nil {
			return fmt.Errorf("ledger: delete bucket %s: %w", id, err)
		}
		if resp.Succeeded {
			return nil
		}
	}
	return ErrConflict
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

// MaxSeedBuckets is the most buckets a configuration may seed: the
// seeding is one etcd transaction (at most 128 operations, counted with
// the nested ones that keep buckets already stored) with its marker.
const MaxSeedBuckets = 126

// SeedBuckets writes the configured buckets once per cluster: after the
// first seeding, etcd (changed through the admin API) is the source of
// truth and later calls do nothing. A bucket an operator already stored
// under a configured id (through the admin API, before the configuration
// named any bucket) is kept as it is. It returns whether this call
// seeded, and the configured ids it kept from etcd instead.
func (l *Ledger) SeedBuckets(ctx context.Context, specs []*adminv1.BucketSpec) (bool, []string, error) {
	if len(specs) > MaxSeedBuckets {
		return false, nil, fmt.Errorf("%w: %d configured buckets are more than the %d one seeding can write; configure at most %d and add the others with the admin API", ErrInvalid, len(specs), MaxSeedBuckets, MaxSeedBuckets)
	}
	ops := []clientv3.Op{clientv3.OpPut(l.seededKey(), l.opts.Now().UTC().Format(time.RFC3339))}
	for _, s := range specs {
		data, err := protojson.Marshal(s)
		if err != nil {
			return false, nil, err
		}
		key := l.bucketKey(s.GetId())
		ops = append(ops, clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
			[]clientv3.Op{clientv3.OpPut(key, string(data))}, nil))
	}
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(l.seededKey()), "=", 0)).Then(ops...).Commit()
	if err != nil {
		return false, nil, fmt.Errorf("ledger: seed buckets: %w", err)
	}
	if !resp.Succeeded {
		return false, nil, nil
	}
	var kept []string
	for i, r := range resp.Responses[1:] {
		if t := r.GetResponseTxn(); t != nil && !t.Succeeded {
			kept = append(kept, specs[i].GetId())
		}
	}
	return true, kept, nil
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

// CommitResult is the recorded outcome of a commit.
type CommitResult struct {
	Period           string `json:"period"`
	Size             int64  `json:"size"`
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

// Committed reports whether a commit of reservation resID applied: its
// marker stands (kept for CommitMarkerTTL, longer than an upload retries
// its commit).
func (l *Ledger) Committed(ctx context.Context, resID string) (bool, error) {
	_, ok, err := l.readMarker(ctx, resID)
	return ok, err
}

// Usage is one bucket's accounting in a period.
type Usage struct {
	Used, Reserved int64
}

// Usages returns, per bucket, committed bytes of the current period (base
// plus every replica's shard) and bytes held in capacity blocks (which
// contain all live reservations), read at one revision. Reservation keys
// are not read: every replica refreshes this several times a second, and
// ranging over thousands of live reservations on the hot bucket would cost
// etcd more than the allocations themselves.
func (l *Ledger) Usages(ctx context.Context) (map[string]Usage, Period, error) {
	p := l.Period()
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Txn(ctx).Then(
		clientv3.OpGet(l.usagePrefix(p.Name), clientv3.WithPrefix()),
		clientv3.OpGet(l.opts.Prefix+"ushard/"+p.Name+"/", clientv3.WithPrefix()),
		clientv3.OpGet(l.opts.Prefix+"cap/blocks/", clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, p, fmt.Errorf("ledger: read usage: %w", err)
	}
	out := map[string]Usage{}
	add := func(bucket string, f func(*Usage)) {
		u := out[bucket]
		f(&u)
		out[bucket] = u
	}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
		add(strings.TrimPrefix(string(kv.Key), l.usagePrefix(p.Name)), func(u *Usage) { u.Used += n })
	}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
		b, _, _ := strings.Cut(strings.TrimPrefix(string(kv.Key), l.opts.Prefix+"ushard/"+p.Name+"/"), "/")
		add(b, func(u *Usage) { u.Used += n })
	}
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
		b, _, _ := strings.Cut(strings.TrimPrefix(string(kv.Key), l.opts.Prefix+"cap/blocks/"), "/")
		add(b, func(u *Usage) { u.Reserved += n })
	}
	return out, p, nil
}

// UsedIn returns a bucket's committed bytes in the named period (base plus
// every replica's shard), which need not be the current one.
func (l *Ledger) UsedIn(ctx context.Context, period, bucketID string) (int64, error) {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Txn(ctx).Then(
		clientv3.OpGet(l.usagePrefix(period)+bucketID),
		clientv3.OpGet(l.shardPrefix(period, bucketID), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return 0, fmt.Errorf("ledger: read usage of %s in %s: %w", bucketID, period, err)
	}
	var used int64
	for _, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().Kvs {
			n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
			used += n
		}
	}
	return used, nil
}

// LiveReservations counts the reservation keys of a bucket (for operators
// and tests; placement never needs it).
func (l *Ledger) LiveReservations(ctx context.Context, bucketID string) (int64, error) {
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	resp, err := l.cli.Get(ctx, l.opts.Prefix+"cap/res/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, fmt.Errorf("ledger: count reservations of %s: %w", bucketID, err)
	}
	var n int64
	for _, kv := range resp.Kvs {
		// cap/res/<owner>/<bucket>/<random>
		rest := strings.TrimPrefix(string(kv.Key), l.opts.Prefix+"cap/res/")
		if _, rest, ok := strings.Cut(rest, "/"); ok && strings.HasPrefix(rest, bucketID+"/") {
			n++
		}
	}
	return n, nil
}

// SetUsage sets a bucket's committed usage for the current period and
// returns the previous value (admin reset and correction): the base key
// takes the value and every replica's shard is removed, in one
// transaction guarded against concurrent commits.
func (l *Ledger) SetUsage(ctx context.Context, bucketID string, used int64) (int64, error) {
	if used < 0 {
		return 0, fmt.Errorf("%w: usage cannot be negative", ErrInvalid)
	}
	period := l.Period().Name
	base := l.usageKey(period, bucketID)
	shards := l.opts.Prefix + "ushard/" + period + "/" + bucketID + "/"
	var prev int64
	err := l.retry(ctx, func() (bool, error) {
		cctx, cancel := l.ctx(ctx)
		defer cancel()
		resp, err := l.cli.Txn(cctx).Then(clientv3.OpGet(base), clientv3.OpGet(shards, clientv3.WithPrefix())).Commit()
		if err != nil {
			return false, fmt.Errorf("ledger: read usage: %w", err)
		}
		prev = 0
		var baseRev int64
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			prev, _ = strconv.ParseInt(string(kvs[0].Value), 10, 64)
			baseRev = kvs[0].ModRevision
		}
		for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
			n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
			prev += n
		}
		tr, err := l.cli.Txn(cctx).If(
			clientv3.Compare(clientv3.ModRevision(base), "=", baseRev),
			clientv3.Compare(clientv3.ModRevision(shards).WithPrefix(), "<", resp.Header.Revision+1),
		).Then(clientv3.OpPut(base, strconv.FormatInt(used, 10)), clientv3.OpDelete(shards, clientv3.WithPrefix())).Commit()
		if err != nil {
			return false, fmt.Errorf("ledger: set usage: %w", err)
		}
		return tr.Succeeded, nil
	})
	return prev, err
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
