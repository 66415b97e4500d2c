package ledger

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
)

// Capacity is one allocator replica's view of the ledger with capacity
// blocks (DESIGN "Mechanism"). The replica holds, per bucket, a block of
// the bucket's free capacity under its own lease, taken with one
// compare-and-put against every other block and all committed usage.
// Reservations are carved inside the block without compares and written
// in batches; committed bytes go to the replica's own usage shard. So the
// hot bucket has no hot key, and at every revision
//
//	base usage + Σ usage shards + Σ blocks ≤ monthly limit.
//
// Reservation keys live under the replica's lease: if the replica dies,
// its blocks and reservations vanish within one lease TTL and a Renew or
// Commit on another replica re-establishes them against current capacity.
// The granting replica enforces each reservation's own TTL.
type Capacity struct {
	l        *Ledger
	id       string
	leaseTTL time.Duration
	log      *slog.Logger

	mu  sync.Mutex
	cur *term // nil while the replica holds no lease
	// started is closed when a term starts, and replaced when it ends;
	// hadTerm says one has, and endedAt when the last one ended (see
	// wait).
	started chan struct{}
	hadTerm bool
	endedAt time.Time

	writes  chan *write
	stopped chan struct{} // closed when Run returns

	markers, idems, claims rotatingLease

	// shardsSeen is each other replica's usage shard as the last fold
	// found it (key to mod revision), under foldMu.
	foldMu     sync.Mutex
	shardsSeen map[string]int64

	corrections atomic.Uint64 // see UsageCorrections

	// suspect is signalled when etcd refused a write for a lease it does
	// not have: the term's lease may be gone before its keepalive says so
	// (a pause longer than the TTL), and every write until then would fail.
	suspect chan struct{}
}

// rotatingLease is a lease many keys hang on, without a lease grant per
// key: granted for 5/4 of the TTL and replaced after a quarter of it, so
// each key lives between the TTL (which config promises: a retry within
// it finds the commit marker or the upload's record) and 5/4 of it.
type rotatingLease struct {
	mu sync.Mutex
	id clientv3.LeaseID
	at time.Time
}

func (r *rotatingLease) get(ctx context.Context, l *Ledger, ttl time.Duration) (clientv3.LeaseID, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.id != 0 && time.Since(r.at) < ttl/4 {
		return r.id, nil
	}
	id, err := l.grant(ctx, ttl+ttl/4)
	if err != nil {
		return 0, err
	}
	r.id, r.at = id, time.Now()
	return id, nil
}

// drop forgets the lease, so the next get grants a new one: etcd no
// longer has it (restored from a backup taken before its grant, or
// revoked by hand), and every write hung on it would fail until it aged.
func (r *rotatingLease) drop() {
	r.mu.Lock()
	r.id = 0
	r.mu.Unlock()
}

// leases are what a commit's keys hang on: its marker, and the upload's
// record when it carries an idempotency key.
type leases struct{ marker, idem clientv3.LeaseID }

func (c *Capacity) leasesFor(ctx context.Context, idem *Idempotency) (leases, error) {
	var ls leases
	var err error
	if ls.marker, err = c.markers.get(ctx, c.l, c.l.opts.CommitMarkerTTL); err != nil {
		return ls, err
	}
	if idem != nil && idem.Key != "" {
		ls.idem, err = c.idems.get(ctx, c.l, c.l.opts.IdempotencyTTL)
	}
	return ls, err
}

// term is one life of the replica's lease. Blocks and reservations are
// named after the term (owner), not only the replica: if a lost lease
// could not be revoked, its keys live on until it expires, and a new term
// must neither adopt that block nor miss those reservations. Every
// operation works on the term it started in, so a late write of an old
// term lands in the old term's own block and state.
type term struct {
	lease clientv3.LeaseID
	owner string        // replica id + "." + lease, names blocks and reservations
	done  chan struct{} // closed when the term ends

	mu      sync.Mutex
	buckets map[string]*bucketCap
}

func (t *term) bucket(id string) *bucketCap {
	t.mu.Lock()
	defer t.mu.Unlock()
	bc := t.buckets[id]
	if bc == nil {
		bc = &bucketCap{res: map[string]*localRes{}}
		t.buckets[id] = bc
	}
	return bc
}

func (t *term) lookup(id string) *bucketCap {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buckets[id]
}

func (t *term) bucketIDs() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	ids := make([]string, 0, len(t.buckets))
	for id := range t.buckets {
		ids = append(ids, id)
	}
	return ids
}

// rereadAll marks every block for a recheck before it is carved again.
func (t *term) rereadAll() {
	for _, id := range t.bucketIDs() {
		if bc := t.lookup(id); bc != nil {
			bc.mu.Lock()
			bc.recheck = true
			bc.mu.Unlock()
		}
	}
}

// errLeaseGone ends a term whose lease etcd no longer has, found before
// the keepalive noticed; a new term starts at once.
var errLeaseGone = errors.New("etcd no longer has this replica's lease")

// errLeaseLost ends operations of a term whose lease is gone.
var errLeaseLost = fmt.Errorf("allocator replica lost its etcd lease: %w", ErrConflict)

type bucketCap struct {
	// wmu serializes this replica's writes of its block and shard keys
	// (grow, commit, idle shrink); mu guards the fields below and is held
	// only briefly, so reservations are carved while a commit transaction
	// is in flight. Lock order: wmu, then mu.
	wmu      sync.Mutex
	mu       sync.Mutex
	block    int64 // bytes held by our block key
	blockRev int64 // its mod revision (0: absent): every write of ours
	// compares it, because another replica may shrink our block to commit
	// one of our reservations when it has no room of its own
	blockSeen int64  // revision at which block/blockRev were last known true
	carved    int64  // bytes of our live reservations
	shard     int64  // our committed bytes this period
	shardRev  int64  // mod revision of our shard key (0: absent)
	shardOf   string // period of shard
	res       map[string]*localRes
	touched   time.Time
	// limit is the bucket's limit when the block was last read: a lower
	// one, or recheck, sends carving through grow, which gives back what
	// the block holds beyond the room left. recheck is set when usage was
	// corrected (see usageChanged), or may have been unseen.
	limit   int64
	recheck bool
	// unsure is set from a resync until a read of the block succeeds:
	// after a write with an unknown outcome or a failed compare, block may
	// be less than etcd holds (bytes nobody would hand back) or more
	// (bytes carve must not use). Carving then reads the block first, and
	// the janitor reads it again.
	unsure bool
	// fencing is set when a write of our block got no answer: it compared
	// fenceRev (0: the block was absent) and may still apply, so a read
	// that shows the block at that revision does not settle it. Only a
	// fence (see fence) or a later revision does.
	fencing  bool
	fenceRev int64
	// keepUntil: such a write compared our block absent, so it could
	// apply whenever the block is absent again; until lateApply has
	// passed, an idle block is shrunk to 0 rather than deleted.
	keepUntil time.Time

	queueOnce sync.Once
	queue     chan *pendingCommit // see enqueue
}

type localRes struct {
	size int64
	exp  time.Time
	// written is set once the reservation's put returned. Until then the
	// janitor must not drop it: a late put would otherwise land outside
	// the block.
	written bool
	// rev is the revision the put applied at (0: unknown, the put failed
	// ambiguously). Deletions older than rev concern an earlier
	// reservation with the same id and must not free this one.
	rev int64
	// after is a revision at which the key was known absent before the
	// put was sent (0 for a new id): with rev unknown, a deletion at or
	// before it is of an earlier reservation under the id (one a Renew
	// re-establishes), however late its event arrives.
	after int64
	// ending is set while this replica's own commit or release of the
	// reservation is in flight: its deletion on the watch is ours, and the
	// writer forgets it, so apply need not read the block for it.
	ending bool
	// unapplied is set while the put's outcome is unknown (its answer was
	// lost) and the janitor has not yet seen the key in etcd: a put on its
	// way may still apply, so the bytes are held until lateApply after
	// the reservation's expiry. The janitor looks again at nextLook, not
	// on every tick.
	unapplied bool
	nextLook  time.Time
}

// unappliedLook is how often the janitor reads the key of a reservation
// whose put was never seen, between its expiry and lateApply after it.
const unappliedLook = 5 * time.Second

// lateApply is how long after a reservation's expiry its bytes stay held
// when the put's answer was lost and its key was never seen in etcd: well
// past any plausible late apply of a request etcd had taken in.
const lateApply = 2 * time.Minute

// batchLinger is how long a reservation or commit batch waits for more
// after its first entry. Under load it makes batches several times larger
// and etcd spends its CPU on fewer transactions (hot-bucket reservations
// 1.06–1.2x -> 1.5–1.6x the plain Put rate in BenchmarkAllocator).
const batchLinger = 300 * time.Microsecond

// gather adds to batch what is queued on ch, up to max entries. It waits
// up to batchLinger for more only while the batch is smaller than the
// previous one (prev): the callers of the last batch usually come straight
// back, so a full batch goes at once and a lone request is not delayed.
func gather[T any](ch <-chan T, batch []T, max, prev int) []T {
	var deadline <-chan time.Time
	for len(batch) < max {
		select {
		case x := <-ch:
			batch = append(batch, x)
			continue
		default:
		}
		if len(batch) >= prev {
			return batch
		}
		if deadline == nil {
			t := time.NewTimer(batchLinger)
			defer t.Stop()
			deadline = t.C
		}
		select {
		case x := <-ch:
			batch = append(batch, x)
		case <-deadline:
			return batch
		}
	}
	return batch
}

// writers is how many reservation batches one replica keeps in flight.
const writers = 1

// idleBlock is how long a block's unused capacity stays with a replica
// that stopped allocating before it goes back to the bucket.
const idleBlock = 500 * time.Millisecond

// resRecord is a reservation key's value. It is written once per
// reservation on the hot path, so it is plain text, not JSON:
// "<size> <expires, unix ns> <replica holding the bytes> <bucket>".
type resRecord struct {
	Size    int64
	Bucket  string
	Replica string
	Expires time.Time
}

func (r resRecord) encode() string {
	return strconv.FormatInt(r.Size, 10) + " " + strconv.FormatInt(r.Expires.UnixNano(), 10) + " " + r.Replica + " " + r.Bucket
}

func decodeRes(v []byte) (resRecord, error) {
	f := strings.SplitN(string(v), " ", 4)
	if len(f) == 4 {
		size, err1 := strconv.ParseInt(f[0], 10, 64)
		exp, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 == nil && err2 == nil {
			return resRecord{Size: size, Expires: time.Unix(0, exp).UTC(), Replica: f[2], Bucket: f[3]}, nil
		}
	}
	return resRecord{}, fmt.Errorf("ledger: malformed reservation record %q", v)
}

// ParseReservation decodes a reservation key's value: its bytes, its
// bucket and the replica term whose block holds them (history checks).
func ParseReservation(v []byte) (size int64, bucket, replica string, err error) {
	r, err := decodeRes(v)
	return r.Size, r.Bucket, r.Replica, err
}

type write struct {
	op   clientv3.Op
	done chan writeResult
}

type writeResult struct {
	rev int64
	err error
}

func (l *Ledger) blockPrefix(bucket string) string {
	return l.opts.Prefix + "cap/blocks/" + bucket + "/"
}
func (l *Ledger) shardPrefix(period, bucket string) string {
	return l.opts.Prefix + "ushard/" + period + "/" + bucket + "/"
}

// NewCapacity returns the replica's capacity manager; call Run. A
// leaseTTL under 2s (zero included) means the default, 10s.
func (l *Ledger) NewCapacity(replicaID string, leaseTTL time.Duration, log *slog.Logger) *Capacity {
	if leaseTTL < 2*time.Second {
		leaseTTL = 10 * time.Second
	}
	return &Capacity{l: l, id: replicaID, leaseTTL: leaseTTL, log: log,
		started: make(chan struct{}), writes: make(chan *write, 4096), stopped: make(chan struct{}), suspect: make(chan struct{}, 1)}
}

// Run keeps the replica lease alive, batches reservation writes, watches
// reservations changed by other replicas and expires our own, until ctx
// ends. Losing the lease drops every local block and reservation.
func (c *Capacity) Run(ctx context.Context) error {
	defer close(c.stopped)
	var wg sync.WaitGroup
	// Fewer writers make bigger batches: on the hot bucket the allocator is
	// bound by etcd's CPU per transaction, not by round trips (measured:
	// 1 writer 1.18x Put, 2 writers 1.13x, 4 writers 0.92x, 8 writers
	// 0.73x, in BenchmarkAllocator).
	for range writers {
		wg.Go(func() { c.writer(ctx) })
	}
	wg.Go(func() { c.janitor(ctx) })
	for ctx.Err() == nil {
		if err := c.term(ctx); err != nil && ctx.Err() == nil {
			c.log.Warn("capacity lease lost; starting over", "error", err.Error())
			if errors.Is(err, errLeaseGone) {
				continue // etcd answers: no reason to wait
			}
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	wg.Wait()
	return nil
}

func (c *Capacity) term(ctx context.Context) error {
	gctx, cancel := c.l.ctx(ctx)
	g, err := c.l.cli.Grant(gctx, int64(c.leaseTTL/time.Second))
	cancel()
	if err != nil {
		return err
	}
	kctx, kcancel := context.WithCancel(ctx)
	defer kcancel()
	ka, err := c.l.cli.KeepAlive(kctx, g.ID)
	if err != nil {
		return err
	}
	t := &term{lease: g.ID, owner: keySafe(c.id) + "." + strconv.FormatInt(int64(g.ID), 16),
		done: make(chan struct{}), buckets: map[string]*bucketCap{}}
	// Watch before serving: every deletion of this term's reservations by
	// others after its first allocation is then seen. Only our own keys,
	// and only deletions: renewals elsewhere are re-read when they matter
	// (expiry, a failed commit compare), and every put of the hot bucket
	// sent to every replica would cost etcd more than the puts themselves.
	//
	// A second watch follows usage corrections (an operator's, or a
	// fold): a block taken before one may hold more than the room left,
	// and must be read again before it is carved. Both start at the
	// lease's revision, not whenever etcd registers them, so an event
	// between the two is not missed; a watch that fails is made again
	// from now, after which every block is read again before it is
	// carved, as a correction may have been missed.
	var wcancel context.CancelFunc
	defer func() { wcancel() }()
	var watch, usageWatch clientv3.WatchChan
	from := clientv3.WithRev(g.Revision + 1)
	rewatch := func() {
		var wctx context.Context
		wctx, wcancel = context.WithCancel(clientv3.WithRequireLeader(ctx))
		watch = c.l.cli.Watch(wctx, c.l.ownerResPrefix(t.owner), clientv3.WithPrefix(), clientv3.WithFilterPut(), from)
		usageWatch = c.l.cli.Watch(wctx, c.l.opts.Prefix+"usage/", clientv3.WithPrefix(), clientv3.WithFilterDelete(), from)
		from = clientv3.WithRev(0)
	}
	rewatch()
	restart := func() {
		wcancel()
		rewatch()
		t.rereadAll()
	}
	c.mu.Lock()
	c.cur, c.hadTerm = t, true
	close(c.started)
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.cur, c.started, c.endedAt = nil, make(chan struct{}), time.Now()
		c.mu.Unlock()
		close(t.done)
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		_, _ = c.l.cli.Revoke(rctx, g.ID) // hand the capacity back now
		rcancel()
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-ka:
			if !ok {
				return errors.New("keepalive channel closed")
			}
		case <-c.suspect:
			gctx, cancel := c.l.ctx(ctx)
			ttl, err := c.l.cli.TimeToLive(gctx, g.ID)
			cancel()
			if err == nil && ttl.TTL <= 0 {
				return errLeaseGone
			}
		case wr, ok := <-watch:
			if !ok || wr.Err() != nil {
				// Missed deletions only delay frees (the janitor catches
				// up); missed corrections are made up for by rechecks.
				restart()
				continue
			}
			c.apply(ctx, t, wr.Events)
		case wr, ok := <-usageWatch:
			if !ok || wr.Err() != nil {
				restart()
				continue
			}
			c.usageChanged(t, wr.Events)
		}
	}
}

// UsageCorrections counts the corrections of base usage (ResetUsage,
// CorrectUsage, on any replica) this replica has seen on its watch, so a
// cached estimate of usage can tell that it is out of date.
func (c *Capacity) UsageCorrections() uint64 { return c.corrections.Load() }

// usageChanged marks the blocks of buckets whose usage was corrected for
// a recheck: the next carve reads the room left first.
func (c *Capacity) usageChanged(t *term, evs []*clientv3.Event) {
	if len(evs) > 0 {
		c.corrections.Add(1)
	}
	for _, ev := range evs {
		rest := strings.TrimPrefix(string(ev.Kv.Key), c.l.opts.Prefix+"usage/")
		_, bucket, ok := strings.Cut(rest, "/")
		if !ok {
			continue
		}
		if bc := t.lookup(bucket); bc != nil {
			bc.mu.Lock()
			bc.recheck = true
			bc.mu.Unlock()
		}
	}
}

// observeBlock records our block as read at revision rev, unless we
// already know a later state.
func observeBlock(bc *bucketCap, kvs []*mvccpb.KeyValue, rev int64) {
	if rev < bc.blockSeen {
		return
	}
	bc.block, bc.blockRev, bc.unsure = 0, 0, false
	if len(kvs) > 0 {
		bc.block, _ = strconv.ParseInt(string(kvs[0].Value), 10, 64)
		bc.blockRev = kvs[0].ModRevision
	}
	if bc.fencing {
		if bc.blockRev == bc.fenceRev {
			bc.unsure = true // carving goes through grow, which fences
		} else {
			bc.fencing, bc.fenceRev = false, 0 // the write applied, or can no longer
		}
	}
	bc.blockSeen = rev
}

// needFence notes a write of our block, compared on rev (0: absent),
// whose answer was lost. Called with bc.mu held.
func (bc *bucketCap) needFence(rev int64) {
	bc.unsure, bc.fencing, bc.fenceRev = true, true, rev
	if rev == 0 {
		bc.keepUntil = time.Now().Add(lateApply)
	}
}

// deletedBy reports whether a deletion of the key at revision rev can be
// of this reservation rather than of an earlier one under its id.
func (r *localRes) deletedBy(rev int64) bool {
	if r.rev != 0 {
		return rev > r.rev
	}
	return rev > r.after
}

// forget drops a local reservation whose key is gone as of revision rev,
// with our block known at rev or later. Called with bc.mu held.
func forget(bc *bucketCap, id string, rev int64) {
	r, ok := bc.res[id]
	if !ok || !r.written || !r.deletedBy(rev) {
		return // a newer reservation under the same id, or its put is in flight
	}
	if r.unapplied {
		// Its put got no answer and may apply after this deletion, and
		// the key would then hold bytes the view had freed: the janitor
		// frees them once it has seen the key, or at lateApply (see
		// sweep).
		return
	}
	delete(bc.res, id)
	bc.carved -= r.size
}

// apply follows deletions of our reservations. Ours are already gone from
// the view (we forget before the event arrives); one still there was
// committed or released by another replica. A commit from another replica
// may have taken its bytes out of our block in the same transaction, so
// the block is read again (at a revision at least as new as the deletion)
// before the bytes are freed. If that read fails, the reservation stays
// until the janitor finds its key gone.
func (c *Capacity) apply(ctx context.Context, t *term, evs []*clientv3.Event) {
	prefix := c.l.ownerResPrefix(t.owner)
	for _, ev := range evs {
		if ev.Type != clientv3.EventTypeDelete {
			continue
		}
		bucket, rnd, ok := strings.Cut(strings.TrimPrefix(string(ev.Kv.Key), prefix), "/")
		if !ok {
			continue
		}
		bc := t.lookup(bucket)
		if bc == nil {
			continue
		}
		id := t.owner + "~" + rnd
		bc.mu.Lock()
		if r, ok := bc.res[id]; ok && r.written && !r.ending && r.deletedBy(ev.Kv.ModRevision) {
			gctx, cancel := c.l.ctx(ctx)
			resp, err := c.l.cli.Get(gctx, c.l.blockPrefix(bucket)+t.owner)
			cancel()
			if err == nil {
				observeBlock(bc, resp.Kvs, resp.Header.Revision)
				forget(bc, id, ev.Kv.ModRevision)
			}
		}
		bc.mu.Unlock()
	}
}

// current returns the live term, or nil.
func (c *Capacity) current() *term {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur
}

// leaseGap is how long after a term ends calls wait for the next one:
// time for etcd to grant a new lease, which takes milliseconds when etcd
// answers.
const leaseGap = time.Second

// errNoLease refuses a call while the replica holds no lease; the
// allocator answers it UNAVAILABLE, which callers retry on another
// replica.
var errNoLease = fmt.Errorf("allocator replica has no etcd lease: %w", context.DeadlineExceeded)

// wait returns the live term once the replica has its first lease. A
// call that comes in the moment between two terms (the lease was lost,
// the next is being granted) waits for the next, until leaseGap after the
// last term ended: failing at once, a caller retrying within milliseconds
// could run out of tries in that gap. It does not wait when its deadline
// comes first, when the gap has lasted longer (the replica cannot reach
// etcd), or once Run has returned: then it is refused at once, so the
// caller's retry goes to another replica in time.
func (c *Capacity) wait(ctx context.Context) (*term, error) {
	for {
		c.mu.Lock()
		t, started, had, until := c.cur, c.started, c.hadTerm, c.endedAt.Add(leaseGap)
		c.mu.Unlock()
		if t != nil {
			return t, nil
		}
		var gap <-chan time.Time
		if had {
			if d, ok := ctx.Deadline(); ok && d.Before(until) || !time.Now().Before(until) {
				return nil, errNoLease
			}
			timer := time.NewTimer(time.Until(until))
			defer timer.Stop()
			gap = timer.C
		}
		select {
		case <-started:
		case <-gap:
			return nil, errNoLease
		case <-c.stopped:
			return nil, errNoLease
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// writer batches reservation puts into transactions without compares:
// they are carved inside our block, so no other writer can make them
// overcommit.
func (c *Capacity) writer(ctx context.Context) {
	prev := 0
	for {
		var batch []*write
		select {
		case <-ctx.Done():
			return
		case w := <-c.writes:
			batch = append(batch, w)
		}
		batch = gather(c.writes, batch, 100, prev)
		prev = len(batch)
		rev, err := c.send(ctx, batch)
		if errors.Is(err, errNotApplied) && len(batch) > 1 {
			// A put under a lease that is gone (a late write of a term
			// that ended) makes etcd refuse the whole transaction: each
			// write goes again alone, so only that one fails.
			for _, w := range batch {
				rev, err := c.send(ctx, []*write{w})
				w.done <- writeResult{rev: rev, err: err}
			}
			continue
		}
		for _, w := range batch {
			w.done <- writeResult{rev: rev, err: err}
		}
	}
}

// errNotSent: a write the caller gave up on before a writer took it, so
// etcd never saw it.
var errNotSent = errors.New("ledger: the write was not sent")

// errNotApplied: etcd refused the write's transaction as a whole (a put
// under a lease it no longer has), so none of it applied.
var errNotApplied = errors.New("ledger: etcd refused the write")

// noteLease checks err for etcd's "lease not found" and, finding it, has
// the term check its lease at once (see suspect), and forgets the shared
// leases commit markers, idempotency records and claims hang on, which
// may be the one missing: the next write under each takes a new lease.
func (c *Capacity) noteLease(err error) {
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		c.markers.drop()
		c.idems.drop()
		c.claims.drop()
		select {
		case c.suspect <- struct{}{}:
		default:
		}
	}
}

// LeaseLost reports an error of a write etcd refused because a lease it
// carried is gone (the replica's own, or a shared one its commit records
// or claims hang on): the write did not apply, and a retry, which takes a
// new lease, may succeed.
func LeaseLost(err error) bool { return errors.Is(err, rpctypes.ErrLeaseNotFound) }

// send writes batch in one transaction: the revision it applied at, or
// its error.
func (c *Capacity) send(ctx context.Context, batch []*write) (int64, error) {
	ops := make([]clientv3.Op, len(batch))
	for i, w := range batch {
		ops[i] = w.op
	}
	tctx, cancel := c.l.ctx(ctx)
	defer cancel()
	resp, err := c.l.cli.Txn(tctx).Then(ops...).Commit()
	c.noteLease(err)
	switch {
	case err == nil:
		return resp.Header.Revision, nil
	case errors.Is(err, rpctypes.ErrLeaseNotFound):
		return 0, fmt.Errorf("%w: %w", errNotApplied, err)
	}
	return 0, err
}

// submit hands op to a writer and waits for the batch's answer. Once a
// writer has it, the wait goes on even if ctx ends, bounded by the
// writer's own timeout: a caller that gives up (a client cancelling its
// upload) must not make the write's outcome unknown, since carve then
// holds the bytes for minutes.
func (c *Capacity) submit(ctx context.Context, op clientv3.Op) (int64, error) {
	w := &write{op: op, done: make(chan writeResult, 1)}
	select {
	case c.writes <- w:
	case <-ctx.Done():
		return 0, fmt.Errorf("%w: %w", errNotSent, ctx.Err())
	case <-c.stopped:
		return 0, fmt.Errorf("%w: the replica is stopping", errNotSent)
	}
	select {
	case r := <-w.done:
		return r.rev, r.err
	case <-c.stopped:
		// Taken by a writer that ended with Run: its batch may have gone.
		return 0, errors.New("ledger: the replica stopped during the write")
	}
}

// grow takes more of the bucket's free capacity into our block: one
// compare-and-put against all blocks and all usage of the period.
// Called with bc.wmu and bc.mu held.
func (c *Capacity) grow(ctx context.Context, t *term, bucket *adminv1.BucketSpec, bc *bucketCap, need int64) error {
	id := bucket.GetId()
	// Near a period's turn, the room of both periods (see turnMargin).
	commitTo, periods := c.l.turnAt(c.l.opts.Now())
	limit := bucket.GetMonthlyLimitBytes()
	for attempt := 0; attempt < 100; attempt++ {
		var reads []clientv3.Op
		for _, p := range periods {
			reads = append(reads, clientv3.OpGet(c.l.usageKey(p.Name, id)), clientv3.OpGet(c.l.shardPrefix(p.Name, id), clientv3.WithPrefix()))
		}
		rctx, cancel := c.l.ctx(ctx)
		resp, err := c.l.cli.Txn(rctx).Then(append(reads, clientv3.OpGet(c.l.blockPrefix(id), clientv3.WithPrefix()))...).Commit()
		cancel()
		if err != nil {
			return fmt.Errorf("ledger: read capacity of %s: %w", id, err)
		}
		rev := resp.Header.Revision
		// used is the most any of the periods has committed.
		var used, held int64
		usageRevs := make([]int64, len(periods))
		bc.shard, bc.shardRev, bc.shardOf = 0, 0, commitTo.Name
		for i, p := range periods {
			var u int64
			if kvs := resp.Responses[2*i].GetResponseRange().Kvs; len(kvs) > 0 {
				u, _ = strconv.ParseInt(string(kvs[0].Value), 10, 64)
				usageRevs[i] = kvs[0].ModRevision
			}
			myShardKey := c.l.shardPrefix(p.Name, id) + c.id
			for _, kv := range resp.Responses[2*i+1].GetResponseRange().Kvs {
				n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
				u += n
				if p.Name == commitTo.Name && string(kv.Key) == myShardKey {
					bc.shard, bc.shardRev = n, kv.ModRevision
				}
			}
			used = max(used, u)
		}
		myBlock := c.l.blockPrefix(id) + t.owner
		var mine []*mvccpb.KeyValue
		for _, kv := range resp.Responses[2*len(periods)].GetResponseRange().Kvs {
			n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
			held += n
			if string(kv.Key) == myBlock {
				mine = []*mvccpb.KeyValue{kv}
			}
		}
		observeBlock(bc, mine, rev)
		bc.limit = limit
		var ours int64 // our block as etcd holds it at rev
		if len(mine) > 0 {
			ours, _ = strconv.ParseInt(string(mine[0].Value), 10, 64)
		}
		if bc.fencing {
			// A write of our block whose outcome is unknown compared
			// this revision: settled before the block is used, or it
			// could apply on top of what is carved from it.
			if err := c.settleFence(context.WithoutCancel(ctx), t, bc, myBlock, ours); err != nil {
				return fmt.Errorf("ledger: settle an unanswered write of the block of %s: %w", id, err)
			}
			continue // read again
		}
		var oursRev int64 // 0: absent
		if len(mine) > 0 {
			oursRev = mine[0].ModRevision
		}
		// setBlock writes our block as n if nothing changed since rev:
		// the usage, the shards and every block. Not cancelled with the
		// caller: a client giving up must not leave the outcome unknown.
		// Our block is compared exactly, as the prefix compares pass
		// when a key was deleted: a write whose answer was lost must not
		// bring back a block the janitor removed since.
		cmps := []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(c.l.blockPrefix(id)).WithPrefix(), "<", rev+1),
			clientv3.Compare(clientv3.ModRevision(myBlock), "=", oursRev),
		}
		for i, p := range periods {
			cmps = append(cmps,
				clientv3.Compare(clientv3.ModRevision(c.l.usageKey(p.Name, id)), "=", usageRevs[i]),
				clientv3.Compare(clientv3.ModRevision(c.l.shardPrefix(p.Name, id)).WithPrefix(), "<", rev+1))
		}
		setBlock := func(n int64) (bool, error) {
			resp, err := c.txn(context.WithoutCancel(ctx), cmps,
				clientv3.OpPut(myBlock, strconv.FormatInt(n, 10), clientv3.WithLease(t.lease)))
			if err != nil {
				// It may yet apply, on a block carved meanwhile (a give-
				// back would shrink it below its reservations): fenced
				// before the block is used again.
				if !LeaseLost(err) && !IsNoSpace(err) {
					bc.needFence(oursRev)
				}
				c.resync(context.WithoutCancel(ctx), t, bc, commitTo.Name, id)
				return false, err
			}
			if resp.Succeeded {
				bc.block = n
				bc.blockRev, bc.blockSeen = resp.Header.Revision, resp.Header.Revision
			}
			return resp.Succeeded, nil
		}
		// After a lower limit or a usage correction, our block may hold
		// more than the room left: what no reservation of ours uses goes
		// back, or it would be carved beyond the limit.
		room := limit - used - (held - ours)
		if bc.block > room && bc.block > bc.carved && bc.blockSeen == rev {
			if _, err := setBlock(max(bc.carved, room)); err != nil {
				return err
			}
			continue // read again: the room may have changed meanwhile
		}
		if bc.blockSeen == rev {
			// Reservations may hold more than the room left: then bytes
			// they free must go back, not be carved again, so every
			// carve reads first until the block fits the room.
			bc.recheck = bc.block > room
		}
		free := limit - used - held
		want := need - (bc.block - bc.carved)
		if want <= 0 {
			return nil
		}
		if free < want {
			return ErrNoRoom
		}
		// Take a share of what is free, shrinking as capacity runs out,
		// so one replica cannot starve the others near the limit.
		take := max(want, min(free/8, 64<<20))
		if ok, err := setBlock(bc.block + take); ok || err != nil {
			return err
		}
	}
	return ErrConflict
}

func (c *Capacity) txn(ctx context.Context, cmps []clientv3.Cmp, ops ...clientv3.Op) (*clientv3.TxnResponse, error) {
	tctx, cancel := c.l.ctx(ctx)
	defer cancel()
	resp, err := c.l.cli.Txn(tctx).If(cmps...).Then(ops...).Commit()
	c.noteLease(err)
	if err != nil {
		return nil, fmt.Errorf("ledger: capacity write: %w", err)
	}
	return resp, nil
}

// carve takes size bytes from our block for a reservation id (growing the
// block when needed) and writes its key. after is a revision at which the
// key was absent (0 for a new id).
func (c *Capacity) carve(ctx context.Context, t *term, bucket *adminv1.BucketSpec, id string, size int64, ttl time.Duration, after int64) (*Reservation, error) {
	if size <= 0 {
		return nil, fmt.Errorf("%w: size must be positive", ErrInvalid)
	}
	if size > bucket.GetMonthlyLimitBytes() {
		return nil, ErrNoRoom
	}
	bc := t.bucket(bucket.GetId())
	bc.mu.Lock()
	if stale := func() bool {
		return bc.unsure || bc.recheck || bc.block-bc.carved < size || bucket.GetMonthlyLimitBytes() < bc.limit
	}; stale() {
		// Growing writes our block: take the write lock first. It reads
		// the block before anything, which settles an unsure one.
		bc.mu.Unlock()
		bc.wmu.Lock()
		bc.mu.Lock()
		if stale() {
			if err := c.grow(ctx, t, bucket, bc, size); err != nil {
				bc.mu.Unlock()
				bc.wmu.Unlock()
				return nil, err
			}
		}
		bc.wmu.Unlock()
	}
	if _, dup := bc.res[id]; dup {
		bc.mu.Unlock()
		return nil, fmt.Errorf("%w: reservation %s is already held here", ErrConflict, id)
	}
	exp := c.l.opts.Now().Add(ttl)
	r := &localRes{size: size, exp: exp, after: after}
	bc.carved += size
	bc.res[id] = r
	bc.touched = time.Now()
	bc.mu.Unlock()
	val := resRecord{Size: size, Bucket: bucket.GetId(), Replica: t.owner, Expires: exp}.encode()
	rev, err := c.submit(ctx, clientv3.OpPut(c.l.resKey(bucket.GetId(), id), val, clientv3.WithLease(t.lease)))
	bc.mu.Lock()
	r.written, r.rev = true, rev
	switch {
	case errors.Is(err, errNotSent), errors.Is(err, errNotApplied):
		// Never in etcd: the bytes go back to the block at once.
		bc.carved -= size
		delete(bc.res, id)
	case err != nil:
		// Ambiguous: the put may still apply (see unapplied). Once the
		// janitor reads the key, it applied, and cannot again: the bytes
		// then go back at the expiry, after a passing etcd fault as
		// after any other reservation left unused.
		r.unapplied = true
	}
	bc.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("ledger: write reservation: %w", err)
	}
	return &Reservation{ID: id, BucketID: bucket.GetId(), Size: size, Period: c.l.Period().Name, LeaseID: t.lease, ExpiresAt: exp}, nil
}

// Reserve grants size bytes on bucket for ttl, or ErrNoRoom.
func (c *Capacity) Reserve(ctx context.Context, bucket *adminv1.BucketSpec, size int64, ttl time.Duration) (*Reservation, error) {
	t, err := c.wait(ctx)
	if err != nil {
		return nil, err
	}
	return c.carve(ctx, t, bucket, t.owner+"~"+NewReservationID(), size, ttl, 0)
}

// Renew extends a live reservation (on any replica), or re-establishes a
// vanished one from this replica's block, or ErrReservationLost.
func (c *Capacity) Renew(ctx context.Context, bucket *adminv1.BucketSpec, resID string, size int64, ttl time.Duration) (time.Time, bool, error) {
	if !validID(resID) || size <= 0 {
		return time.Time{}, false, fmt.Errorf("%w: a valid reservation id and reserved bytes are required", ErrInvalid)
	}
	t, err := c.wait(ctx)
	if err != nil {
		return time.Time{}, false, err
	}
	key := c.l.resKey(bucket.GetId(), resID)
	var absent int64 // revision at which the key was read absent
	for attempt := 0; attempt < 10; attempt++ {
		gctx, cancel := c.l.ctx(ctx)
		resp, err := c.l.cli.Get(gctx, key)
		cancel()
		if err != nil {
			return time.Time{}, false, fmt.Errorf("ledger: read reservation: %w", err)
		}
		if len(resp.Kvs) == 0 {
			absent = resp.Header.Revision
			break
		}
		kv := resp.Kvs[0]
		rec, err := decodeRes(kv.Value)
		if err != nil {
			return time.Time{}, false, err
		}
		rec.Expires = c.l.opts.Now().Add(ttl)
		val := rec.encode()
		tr, err := c.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)},
			clientv3.OpPut(key, val, clientv3.WithLease(clientv3.LeaseID(kv.Lease))))
		if err != nil {
			return time.Time{}, false, err
		}
		if tr.Succeeded {
			if rec.Replica == t.owner {
				bc := t.bucket(bucket.GetId())
				bc.mu.Lock()
				if r, ok := bc.res[resID]; ok {
					r.exp = rec.Expires
					if r.rev != 0 {
						r.rev = max(r.rev, tr.Header.Revision)
					}
				}
				bc.mu.Unlock()
			}
			return rec.Expires, false, nil
		}
	}
	if absent == 0 {
		// Every compare lost: the key lives and keeps changing. Carving
		// now would hold the bytes in our block as well as its owner's.
		return time.Time{}, false, fmt.Errorf("ledger: renew %s: %w", resID, ErrConflict)
	}
	// Gone because it was committed (the commit deleted it and wrote its
	// marker in one transaction): nothing to bring back.
	if _, committed, err := c.l.readMarker(ctx, resID); err != nil {
		return time.Time{}, false, err
	} else if committed {
		return time.Time{}, false, fmt.Errorf("%w: reservation %s was committed; there is nothing to renew", ErrInvalid, resID)
	}
	r, err := c.carve(ctx, t, bucket, resID, size, ttl, absent)
	if errors.Is(err, ErrNoRoom) {
		return time.Time{}, false, ErrReservationLost
	}
	if err != nil {
		return time.Time{}, false, err
	}
	return r.ExpiresAt, true, nil
}

// MaxBytes bounds a commit's size (64 PiB, also the largest monthly limit
// config accepts), so that the sums of a commit batch (at most a few dozen
// entries) stay far from overflowing an int64.
const MaxBytes = 1 << 56

// Commit records actual bytes for a reservation exactly once. The bytes
// leave our block and enter our usage shard in one transaction; when the
// reservation belongs to another replica (or vanished), the bytes are
// taken from our own block instead, so the sum never grows.
func (c *Capacity) Commit(ctx context.Context, bucket *adminv1.BucketSpec, resID string, actual int64, idem *Idempotency) (CommitResult, error) {
	if !validID(resID) || actual < 0 {
		return CommitResult{}, fmt.Errorf("%w: a valid reservation id and a non-negative size are required", ErrInvalid)
	}
	if actual > MaxBytes {
		// Checked here, not only against the reservation: a commit whose
		// reservation vanished carries a size nothing else bounds, and a
		// batch adds sizes up in one int64.
		return CommitResult{}, fmt.Errorf("%w: committed %d bytes exceed the %d a commit may carry", ErrInvalid, actual, int64(MaxBytes))
	}
	t, err := c.wait(ctx)
	if err != nil {
		return CommitResult{}, err
	}
	res, err := c.commit(ctx, t, bucket, resID, actual, idem)
	if IsNoSpace(err) {
		// etcd applies the write that crosses its quota and only then
		// answers NOSPACE, and a commit already recorded may be refused
		// a lease before its marker is read. What stands in etcd settles
		// it (reads still work): a caller told "out of space" must be
		// able to trust that the commit did not apply.
		done, prev, rerr := c.readForCommit(ctx, bucket.GetId(), resID, &pendingCommit{})
		switch {
		case rerr != nil:
			return CommitResult{}, fmt.Errorf("ledger: commit refused for lack of space, and whether it applied could not be read: %w", rerr)
		case done:
			c.forgetCommitted(ctx, t, t.bucket(bucket.GetId()), bucket.GetId(), resID)
			return prev, nil
		}
	}
	return res, err
}

// IsNoSpace reports etcd's refusal for lack of space (its NOSPACE alarm).
func IsNoSpace(err error) bool {
	return errors.Is(err, rpctypes.ErrNoSpace) || errors.Is(err, rpctypes.ErrGRPCNoSpace)
}

func (c *Capacity) commit(ctx context.Context, t *term, bucket *adminv1.BucketSpec, resID string, actual int64, idem *Idempotency) (res CommitResult, err error) {
	id := bucket.GetId()
	bc := t.bucket(id)
	unsure := false // a try's transaction failed without an answer
	defer func() {
		if unsure && err != nil && ctx.Err() == nil {
			// Whatever refused a later try says nothing of that one,
			// which may yet apply: the caller must not take a refusal
			// (a lease gone, no room, out of space) for "nothing
			// applied" and remove the object.
			err = fmt.Errorf("%w (then: %v)", ErrOutcomeUnknown, err)
		}
	}()
	for attempt := 0; attempt < 50; attempt++ {
		// Taken again on every try: a lease etcd no longer has is dropped
		// (noteLease), and the next try must not carry it again.
		ls, err := c.leasesFor(ctx, idem)
		if err != nil {
			return CommitResult{}, err
		}
		p := &pendingCommit{bucket: bucket, resID: resID, actual: actual, idem: idem, leases: ls, done: make(chan commitOutcome, 1)}
		// A reservation carved here is known with its revision: the commit
		// transaction's compares (no marker yet, key unchanged) stand in
		// for a linearizable read, which under write load waits tens of
		// milliseconds for etcd to apply. Anything else reads first.
		if attempt > 0 || !localReservation(t, bc, resID, p) {
			done, prev, err := c.readForCommit(ctx, id, resID, p)
			if done && err == nil {
				c.forgetCommitted(ctx, t, bc, id, resID)
			}
			if err != nil || done {
				return prev, err
			}
		}
		if p.exists && actual > p.rec.Size {
			return CommitResult{}, fmt.Errorf("%w: committed %d bytes exceed the %d reserved", ErrInvalid, actual, p.rec.Size)
		}
		out, err := c.enqueue(ctx, t, bc, p)
		if err != nil {
			return CommitResult{}, err
		}
		unsure = unsure || out.unsure
		switch {
		case out.err != nil:
			return CommitResult{}, out.err
		case out.ok:
			return out.res, nil
		case out.dup != nil:
			return CommitResult{DuplicateOf: out.dup}, nil
		case out.noRoom && p.exists:
			// No room of our own: move the bytes out of the owner's block.
			res, done, lost, err := c.commitFromOwner(ctx, t, bucket, resID, actual, p.rec, p.resRev, idem, ls)
			unsure = unsure || lost
			if err != nil || done {
				return res, err
			}
		case out.noRoom:
			return CommitResult{}, ErrReservationLost
		}
		// A compare failed: read again and retry.
	}
	return CommitResult{}, ErrConflict
}

// forgetCommitted drops from the view a reservation of ours that another
// replica committed: its deletion event is not acted on while our own
// commit of it is in flight (ending), so when that commit then finds the
// marker, nothing else frees the bytes before the reservation's expiry.
// As in apply, our block is read at the revision the key is seen gone.
func (c *Capacity) forgetCommitted(ctx context.Context, t *term, bc *bucketCap, bucketID, resID string) {
	bc.mu.Lock()
	r, ok := bc.res[resID]
	local := ok && r.written && !r.ending
	bc.mu.Unlock()
	if !local {
		return
	}
	gctx, cancel := c.l.ctx(ctx)
	resp, err := c.l.cli.Txn(gctx).Then(clientv3.OpGet(c.l.resKey(bucketID, resID)), clientv3.OpGet(c.l.blockPrefix(bucketID)+t.owner)).Commit()
	cancel()
	if err != nil || len(resp.Responses[0].GetResponseRange().Kvs) > 0 {
		return // the janitor frees it at its expiry
	}
	bc.mu.Lock()
	defer bc.mu.Unlock()
	observeBlock(bc, resp.Responses[1].GetResponseRange().Kvs, resp.Header.Revision)
	forget(bc, resID, resp.Header.Revision)
}

// localReservation fills p from this replica's view of its reservation,
// when the view knows the revision the key was last written at.
func localReservation(t *term, bc *bucketCap, resID string, p *pendingCommit) bool {
	bc.mu.Lock()
	defer bc.mu.Unlock()
	r, ok := bc.res[resID]
	if !ok || !r.written || r.rev == 0 {
		return false
	}
	p.exists, p.resRev = true, r.rev
	p.rec = resRecord{Size: r.size, Replica: t.owner, Expires: r.exp}
	return true
}

// readForCommit reads the commit marker and the reservation at one
// revision; done reports a commit already recorded, with its answer.
func (c *Capacity) readForCommit(ctx context.Context, bucketID, resID string, p *pendingCommit) (bool, CommitResult, error) {
	gctx, cancel := c.l.ctx(ctx)
	both, err := c.l.cli.Txn(gctx).Then(clientv3.OpGet(c.l.commitKey(resID)), clientv3.OpGet(c.l.resKey(bucketID, resID))).Commit()
	cancel()
	if err != nil {
		return true, CommitResult{}, fmt.Errorf("ledger: read reservation: %w", err)
	}
	if kvs := both.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		var prev CommitResult
		if err := json.Unmarshal(kvs[0].Value, &prev); err != nil {
			return true, CommitResult{}, fmt.Errorf("ledger: decode commit marker: %w", err)
		}
		prev.AlreadyCommitted = true
		return true, prev, nil
	}
	if kvs := both.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		if rec, err := decodeRes(kvs[0].Value); err == nil {
			p.rec, p.exists, p.resRev = rec, true, kvs[0].ModRevision
		}
	}
	return false, CommitResult{}, nil
}

// pendingCommit waits in a bucket's commit queue.
type pendingCommit struct {
	bucket *adminv1.BucketSpec
	resID  string
	actual int64
	idem   *Idempotency
	rec    resRecord
	exists bool
	resRev int64
	leases leases
	done   chan commitOutcome

	take int64 // bytes leaving our block, set by the worker
	mine bool
}

type commitOutcome struct {
	ok     bool
	res    CommitResult
	dup    []byte
	noRoom bool
	err    error
	// unsure: the batch's transaction failed without an answer (it may
	// yet apply); the caller reads again, but must not later call the
	// commit unapplied on a refusal of another try.
	unsure bool
}

// enqueue hands p to the bucket's committer, which batches concurrent
// commits of this replica into one transaction: the usage shard and the
// block are this replica's own keys, so commits on a hot bucket do not
// contend with other replicas at all.
func (c *Capacity) enqueue(ctx context.Context, t *term, bc *bucketCap, p *pendingCommit) (commitOutcome, error) {
	bc.queueOnce.Do(func() {
		bc.queue = make(chan *pendingCommit, 1024)
		go c.committer(t, bc)
	})
	select {
	case bc.queue <- p:
	case <-t.done:
		return commitOutcome{}, errLeaseLost
	case <-ctx.Done():
		return commitOutcome{}, ctx.Err()
	}
	select {
	case out := <-p.done:
		return out, nil
	case <-t.done:
		return commitOutcome{}, errLeaseLost
	case <-ctx.Done():
		return commitOutcome{}, ctx.Err()
	}
}

func (c *Capacity) committer(t *term, bc *bucketCap) {
	prev := 0
	for {
		var p *pendingCommit
		select {
		case p = <-bc.queue:
		case <-t.done:
			return
		case <-c.stopped:
			return
		}
		batch := gather(bc.queue, []*pendingCommit{p}, 40, prev)
		prev = len(batch)
		for len(batch) > 0 {
			var now []*pendingCommit
			now, batch = distinct(batch)
			bc.wmu.Lock()
			c.commitBatch(context.Background(), t, bc, now)
			bc.wmu.Unlock()
		}
	}
}

// distinct splits batch into commits that can share a transaction and the
// rest, in order: etcd refuses a transaction that writes one key twice,
// which two commits of one reservation (a retry while the first is queued)
// or two uploads under one idempotency key would do.
func distinct(batch []*pendingCommit) (now, later []*pendingCommit) {
	resIDs := make(map[string]bool, len(batch))
	idemKeys := make(map[string]bool, len(batch))
	for _, p := range batch {
		idem := ""
		if p.idem != nil {
			idem = p.idem.Key
		}
		if resIDs[p.resID] || (idem != "" && idemKeys[idem]) {
			later = append(later, p)
			continue
		}
		resIDs[p.resID] = true
		if idem != "" {
			idemKeys[idem] = true
		}
		now = append(now, p)
	}
	return now, later
}

// commitBatch runs with bc.wmu held and answers every pending commit.
// bc.mu is held only to prepare and to apply the result, not across the
// transaction: meanwhile reservations are still carved from the block's
// free part, minus the bytes this batch takes for reservations that are
// not ours (held aside as carved until the transaction is decided).
func (c *Capacity) commitBatch(ctx context.Context, t *term, bc *bucketCap, batch []*pendingCommit) {
	bucket := batch[0].bucket
	id := bucket.GetId()
	period := c.l.Period().Name
	bc.mu.Lock()
	if bc.shardOf != period {
		c.resync(ctx, t, bc, period, id)
	}
	// Bytes for reservations that are not ours come from our block's free
	// part; grow it once for the whole batch.
	var need int64
	for _, p := range batch {
		r := bc.res[p.resID]
		p.mine = p.exists && p.rec.Replica == t.owner && r != nil && r.size == p.rec.Size
		p.take = p.actual
		if p.mine {
			p.take = p.rec.Size
			r.ending = true
		} else {
			need += p.actual
		}
	}
	if need > bc.block-bc.carved {
		if err := c.grow(ctx, t, bucket, bc, need); err != nil {
			kept := batch[:0]
			need = 0
			for _, p := range batch {
				if p.mine {
					kept = append(kept, p)
					continue
				}
				if errors.Is(err, ErrNoRoom) {
					p.done <- commitOutcome{noRoom: true}
				} else {
					p.done <- commitOutcome{err: err}
				}
			}
			batch = kept
			if len(batch) == 0 {
				bc.mu.Unlock()
				return
			}
		}
	}
	bc.carved += need
	block, blockRev, shard, shardRev := bc.block, bc.blockRev, bc.shard, bc.shardRev
	bc.mu.Unlock()

	shardKey := c.l.shardPrefix(period, id) + c.id
	blockKey := c.l.blockPrefix(id) + t.owner
	var sum, take int64
	cmps := []clientv3.Cmp{
		// An admin may have reset usage: never write back a stale shard.
		clientv3.Compare(clientv3.ModRevision(shardKey), "=", shardRev),
		clientv3.Compare(clientv3.ModRevision(blockKey), "=", blockRev),
	}
	var ops, elseOps []clientv3.Op
	for _, p := range batch {
		sum += p.actual
		take += p.take
		marker, _ := json.Marshal(CommitResult{Period: period, Size: p.actual})
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(c.l.commitKey(p.resID)), "=", 0))
		ops = append(ops, clientv3.OpPut(c.l.commitKey(p.resID), string(marker), clientv3.WithLease(p.leases.marker)))
		if p.exists {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(c.l.resKey(id, p.resID)), "=", p.resRev))
			ops = append(ops, clientv3.OpDelete(c.l.resKey(id, p.resID)))
		}
		if p.idem != nil && p.idem.Key != "" {
			k := c.l.idemKey(p.idem.Key)
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
			ops = append(ops, clientv3.OpPut(k, string(p.idem.Record), clientv3.WithLease(p.leases.idem)))
			if len(batch) == 1 {
				elseOps = append(elseOps, clientv3.OpGet(k))
			}
		}
	}
	ops = append(ops,
		clientv3.OpPut(shardKey, strconv.FormatInt(shard+sum, 10)),
		clientv3.OpPut(blockKey, strconv.FormatInt(block-take, 10), clientv3.WithLease(t.lease)))
	tctx, cancel := c.l.ctx(ctx)
	tr, err := c.l.cli.Txn(tctx).If(cmps...).Then(ops...).Else(elseOps...).Commit()
	cancel()
	c.noteLease(err)

	bc.mu.Lock()
	bc.carved -= need
	if err == nil && tr.Succeeded {
		rev := tr.Header.Revision
		bc.shard, bc.shardRev = shard+sum, rev
		// Only our writes change our block while we hold wmu (another
		// replica's would have failed this transaction's compare), so
		// unless a read already showed it at rev or later, it is the
		// snapshot minus what this batch took.
		if rev > bc.blockSeen {
			bc.block, bc.blockRev, bc.blockSeen = block-take, rev, rev
		}
		bc.touched = time.Now()
		for _, p := range batch {
			if p.mine {
				forget(bc, p.resID, rev)
			}
		}
		bc.mu.Unlock()
		for _, p := range batch {
			p.done <- commitOutcome{ok: true, res: CommitResult{Period: period, Size: p.actual}}
		}
		return
	}
	// Ambiguous or a compare failed: resync our keys; the callers re-read
	// the markers, so an applied commit is reported, not repeated.
	for _, p := range batch {
		if r := bc.res[p.resID]; p.mine && r != nil {
			r.ending = false
		}
	}
	unsure := err != nil && !LeaseLost(err) && !IsNoSpace(err)
	if unsure && blockRev > 0 {
		if unsure = c.fence(ctx, t, blockKey, block, blockRev) != nil; unsure {
			bc.needFence(blockRev) // grow fences before the block is used
		}
	}
	c.resync(ctx, t, bc, period, id)
	bc.mu.Unlock()
	if err == nil && len(batch) > 1 {
		for _, p := range batch { // isolate the one that failed
			c.commitBatch(ctx, t, bc, []*pendingCommit{p})
		}
		return
	}
	if err == nil && len(elseOps) > 0 {
		if dup := c.recordedFirst(ctx, tr, batch[0].resID); dup != nil {
			batch[0].done <- commitOutcome{dup: dup}
			return
		}
	}
	for _, p := range batch {
		if IsNoSpace(err) {
			// No passing conflict that a retry gets past: the caller
			// settles it by reading what stands (see Commit).
			p.done <- commitOutcome{err: err}
			continue
		}
		p.done <- commitOutcome{unsure: unsure}
	}
}

// fence settles a commit transaction that got no answer, which could
// otherwise still apply later (a proposal in flight through a leader
// change) and write a block value computed before: reservations carved
// since would then overrun the block. It writes the block's own value on
// the revision that transaction compared. If the fence applies, that
// transaction's compare can never pass; if its compare fails, the block
// moved on: that transaction applied (the caller's read of the markers
// finds it) or can never apply either. It reports whether the fence got
// an answer, and with it the transaction's fate.
func (c *Capacity) fence(ctx context.Context, t *term, blockKey string, block, blockRev int64) error {
	fctx, cancel := c.l.ctx(ctx)
	defer cancel()
	_, err := c.l.cli.Txn(fctx).If(clientv3.Compare(clientv3.ModRevision(blockKey), "=", blockRev)).
		Then(clientv3.OpPut(blockKey, strconv.FormatInt(block, 10), clientv3.WithLease(t.lease))).Commit()
	c.noteLease(err)
	return err
}

// settleFence fences our block at value on the revision a write whose
// answer was lost compared (bc.fenceRev), and clears the note once the
// fence is answered. Called with bc.wmu and bc.mu held.
func (c *Capacity) settleFence(ctx context.Context, t *term, bc *bucketCap, blockKey string, value int64) error {
	if err := c.fence(ctx, t, blockKey, value, bc.fenceRev); err != nil {
		return err
	}
	bc.fencing, bc.fenceRev = false, 0
	return nil
}

// commitFromOwner commits another replica's reservation by moving its
// bytes from the owner's block into our shard, compared on the owner's
// block revision (the owner compares it on every write too). done=false
// means a compare failed: the caller starts over.
//
// unsure says its transaction failed without an answer: it may yet apply.
func (c *Capacity) commitFromOwner(ctx context.Context, t *term, bucket *adminv1.BucketSpec, resID string, actual int64, rec resRecord, resRev int64, idem *Idempotency, ls leases) (_ CommitResult, done, unsure bool, _ error) {
	if ownerOf(resID) != rec.Replica {
		// A reservation re-established under another term's id is not
		// under its owner's watch: the owner would not learn that its
		// block shrank. Fail cleanly; the upload is aborted.
		return CommitResult{}, true, false, ErrReservationLost
	}
	id := bucket.GetId()
	period := c.l.Period().Name
	ownerKey := c.l.blockPrefix(id) + rec.Replica
	gctx, cancel := c.l.ctx(ctx)
	resp, err := c.l.cli.Get(gctx, ownerKey)
	cancel()
	if err != nil {
		return CommitResult{}, false, false, fmt.Errorf("ledger: read owner block: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return CommitResult{}, false, false, nil // owner gone: its reservation will vanish too
	}
	ownerBlock, _ := strconv.ParseInt(string(resp.Kvs[0].Value), 10, 64)
	if ownerBlock < rec.Size {
		// The owner's block does not cover the reservation: most likely
		// it was committed meanwhile (the caller reads again and finds
		// its marker). Moving its bytes out would drive the block
		// negative and hide bytes from every replica's sum.
		return CommitResult{}, false, false, nil
	}
	bc := t.bucket(id)
	bc.wmu.Lock()
	defer bc.wmu.Unlock()
	bc.mu.Lock()
	defer bc.mu.Unlock()
	if bc.shardOf != period {
		c.resync(ctx, t, bc, period, id)
	}
	shardKey := c.l.shardPrefix(period, id) + c.id
	res := CommitResult{Period: period, Size: actual}
	marker, _ := json.Marshal(res)
	cmps := []clientv3.Cmp{
		clientv3.Compare(clientv3.CreateRevision(c.l.commitKey(resID)), "=", 0),
		clientv3.Compare(clientv3.ModRevision(shardKey), "=", bc.shardRev),
		clientv3.Compare(clientv3.ModRevision(ownerKey), "=", resp.Kvs[0].ModRevision),
		clientv3.Compare(clientv3.ModRevision(c.l.resKey(id, resID)), "=", resRev),
	}
	ops := []clientv3.Op{
		clientv3.OpPut(shardKey, strconv.FormatInt(bc.shard+actual, 10)),
		clientv3.OpPut(ownerKey, strconv.FormatInt(ownerBlock-rec.Size, 10), clientv3.WithLease(clientv3.LeaseID(resp.Kvs[0].Lease))),
		clientv3.OpDelete(c.l.resKey(id, resID)),
		clientv3.OpPut(c.l.commitKey(resID), string(marker), clientv3.WithLease(ls.marker)),
	}
	var elseOps []clientv3.Op
	if idem != nil && idem.Key != "" {
		k := c.l.idemKey(idem.Key)
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
		ops = append(ops, clientv3.OpPut(k, string(idem.Record), clientv3.WithLease(ls.idem)))
		elseOps = append(elseOps, clientv3.OpGet(k))
	}
	tctx, cancel := c.l.ctx(ctx)
	tr, err := c.l.cli.Txn(tctx).If(cmps...).Then(ops...).Else(elseOps...).Commit()
	cancel()
	c.noteLease(err)
	if err != nil || !tr.Succeeded {
		c.resync(ctx, t, bc, period, id)
		if IsNoSpace(err) {
			// Settled by the caller's read of what stands (see Commit).
			return CommitResult{}, true, false, err
		}
		if err == nil && len(elseOps) > 0 {
			// Another upload recorded the idempotency key first: that is
			// the answer (as from commitBatch), not a race to retry.
			if dup := c.recordedFirst(ctx, tr, resID); dup != nil {
				return CommitResult{DuplicateOf: dup}, true, false, nil
			}
		}
		return CommitResult{}, false, err != nil && !LeaseLost(err), nil
	}
	bc.shard += actual
	bc.shardRev = tr.Header.Revision
	return res, true, false, nil
}

// recordedFirst returns the idempotency record that a commit transaction
// refused by its compares read in its Else branch (one OpGet of the key),
// when another upload wrote it: resID has no commit marker of its own.
// Nil when the key is free, or when the commit was resID's own (a retry
// after a lost answer), which the caller's read of the marker reports.
func (c *Capacity) recordedFirst(ctx context.Context, tr *clientv3.TxnResponse, resID string) []byte {
	kvs := tr.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return nil
	}
	if _, ours, err := c.l.readMarker(ctx, resID); err != nil || ours {
		return nil
	}
	return kvs[0].Value
}

// resync re-reads our block and shard after an ambiguous write. Until the
// read succeeds the block is unsure (see bucketCap.unsure). Called with
// bc.wmu and bc.mu held.
func (c *Capacity) resync(ctx context.Context, t *term, bc *bucketCap, period, id string) {
	bc.unsure = true // observeBlock clears it
	gctx, cancel := c.l.ctx(ctx)
	defer cancel()
	resp, err := c.l.cli.Txn(gctx).Then(
		clientv3.OpGet(c.l.blockPrefix(id)+t.owner),
		clientv3.OpGet(c.l.shardPrefix(period, id)+c.id),
	).Commit()
	if err != nil {
		return
	}
	observeBlock(bc, resp.Responses[0].GetResponseRange().Kvs, resp.Header.Revision)
	bc.shard, bc.shardRev, bc.shardOf = 0, 0, period
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		bc.shard, _ = strconv.ParseInt(string(kvs[0].Value), 10, 64)
		bc.shardRev = kvs[0].ModRevision
	}
}

// Release ends a reservation without usage; absent ones succeed. The
// delete and a read of our block share one revision: if another replica
// committed the reservation a moment ago (shrinking our block), the local
// view learns the smaller block before it frees the bytes.
func (c *Capacity) Release(ctx context.Context, bucketID, resID string) error {
	if !validID(resID) {
		return fmt.Errorf("%w: a valid reservation id is required", ErrInvalid)
	}
	t := c.current()
	ops := []clientv3.Op{clientv3.OpDelete(c.l.resKey(bucketID, resID))}
	var bc *bucketCap
	if t != nil {
		ops = append(ops, clientv3.OpGet(c.l.blockPrefix(bucketID)+t.owner))
		bc = t.bucket(bucketID)
		bc.mu.Lock()
		if r := bc.res[resID]; r != nil {
			r.ending = true
		}
		bc.mu.Unlock()
	}
	tctx, cancel := c.l.ctx(ctx)
	resp, err := c.l.cli.Txn(tctx).Then(ops...).Commit()
	cancel()
	if bc != nil {
		bc.mu.Lock()
		if r := bc.res[resID]; r != nil {
			if err == nil {
				observeBlock(bc, resp.Responses[1].GetResponseRange().Kvs, resp.Header.Revision)
				forget(bc, resID, resp.Header.Revision)
			} else {
				r.ending = false
			}
		}
		bc.mu.Unlock()
	}
	if err != nil {
		return fmt.Errorf("ledger: release: %w", err)
	}
	return nil
}

// janitor expires our reservations whose holders stopped renewing, and
// hands idle block capacity back so other replicas can use it.
func (c *Capacity) janitor(ctx context.Context) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	fold := time.NewTicker(foldEvery)
	defer fold.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-fold.C:
			if _, err := c.foldShards(ctx); err != nil && ctx.Err() == nil {
				c.log.Warn("could not fold idle usage shards; will try again", "error", err.Error())
			}
			continue
		case <-tick.C:
		}
		if t := c.current(); t != nil {
			for _, id := range t.bucketIDs() {
				if !c.sweep(ctx, t, id) {
					// etcd does not answer: a sweep holds the bucket's
					// locks across its calls, and Reserve and Commit wait
					// on them, so the next round waits for etcd longer.
					select {
					case <-ctx.Done():
					case <-time.After(2 * time.Second):
					}
					break
				}
			}
		}
	}
}

// sweep frees the bucket's expired reservations and returns an idle
// block's bytes. It reports false when an etcd call failed: it stops at
// the first, since the caller's Reserve and Commit wait on its locks.
func (c *Capacity) sweep(ctx context.Context, t *term, id string) bool {
	bc := t.bucket(id)
	bc.wmu.Lock()
	defer bc.wmu.Unlock()
	bc.mu.Lock()
	defer bc.mu.Unlock()
	blockKey := c.l.blockPrefix(id) + t.owner
	if bc.unsure {
		// Bytes a lost answer left in our block go back below, once a
		// write that may still apply is fenced.
		c.resync(ctx, t, bc, c.l.Period().Name, id)
		if bc.unsure && bc.fencing && bc.blockRev == bc.fenceRev {
			if c.settleFence(ctx, t, bc, blockKey, bc.block) != nil {
				return false
			}
			c.resync(ctx, t, bc, c.l.Period().Name, id)
		}
		if bc.unsure {
			return false
		}
	}
	now := c.l.opts.Now()
	for rid, r := range bc.res {
		if !r.written || !now.After(r.exp) || now.Before(r.nextLook) {
			continue
		}
		key := c.l.resKey(id, rid)
		// Another replica may have renewed it a moment ago: delete only if
		// its expiry in etcd has passed too. Read our block at the same
		// revision: if the key is gone because another replica committed
		// it from our block, the smaller block must be known first.
		gctx, cancel := c.l.ctx(ctx)
		resp, err := c.l.cli.Txn(gctx).Then(clientv3.OpGet(key), clientv3.OpGet(blockKey)).Commit()
		cancel()
		if err != nil {
			return false
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 && r.unapplied && !now.After(r.exp.Add(lateApply)) {
			r.nextLook = now.Add(unappliedLook) // the put may still be on its way
			continue
		}
		r.unapplied = false
		if len(kvs) == 0 {
			observeBlock(bc, resp.Responses[1].GetResponseRange().Kvs, resp.Header.Revision)
			forget(bc, rid, resp.Header.Revision)
			continue
		}
		if rec, err := decodeRes(kvs[0].Value); err == nil && rec.Expires.After(now) {
			r.exp = rec.Expires
			continue
		}
		tr, err := c.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", kvs[0].ModRevision)}, clientv3.OpDelete(key))
		if err != nil {
			return false
		}
		if !tr.Succeeded {
			continue
		}
		// The key existed unchanged until our delete: nobody committed it
		// from our block.
		forget(bc, rid, tr.Header.Revision)
	}
	// A block kept at 0 (see keepUntil) goes once its time is up.
	keptEmpty := bc.blockRev != 0 && bc.block == 0 && bc.carved == 0 && time.Now().After(bc.keepUntil)
	if (bc.block > bc.carved || keptEmpty) && time.Since(bc.touched) > idleBlock {
		var op clientv3.Op
		if bc.carved == 0 && time.Now().After(bc.keepUntil) {
			op = clientv3.OpDelete(blockKey)
		} else {
			op = clientv3.OpPut(blockKey, strconv.FormatInt(bc.carved, 10), clientv3.WithLease(t.lease))
		}
		tr, err := c.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(blockKey), "=", bc.blockRev)}, op)
		switch {
		case err == nil && tr.Succeeded:
			rev := tr.Header.Revision
			bc.block, bc.blockRev, bc.blockSeen = bc.carved, rev, rev
			if op.IsDelete() {
				bc.blockRev = 0
			}
		case err == nil:
			c.resync(ctx, t, bc, c.l.Period().Name, id)
		default:
			// The write may have applied, or may yet: the block is
			// fenced before it is used again (see grow).
			bc.needFence(bc.blockRev)
			return false
		}
	}
	return true
}

// foldEvery is how often a replica folds idle usage shards: a shard no one
// wrote between two folds is idle.
const foldEvery = 10 * time.Minute

// foldShards moves the bytes of idle usage shards into their bucket's base
// usage key and deletes the shards. Every replica writes a shard of its
// own per bucket and period, and every process start is a new replica:
// without folding, shards of replicas long gone pile up in etcd, and grow
// and Usages read them all. Folded are the shards of past periods and, in
// the current one, those of other replicas unchanged since the last fold.
// Each fold is one transaction comparing the base key and the shard, so
// it races safely with commits (a replica whose shard was folded finds its
// compare failed, reads again and starts a new shard), with SetUsage and
// with other replicas folding. It returns how many shards it folded.
func (c *Capacity) foldShards(ctx context.Context) (int, error) {
	c.foldMu.Lock()
	defer c.foldMu.Unlock()
	rctx, cancel := c.l.ctx(ctx)
	resp, err := c.l.cli.Txn(rctx).Then(
		clientv3.OpGet(c.l.opts.Prefix+"ushard/", clientv3.WithPrefix()),
		clientv3.OpGet(c.l.opts.Prefix+"usage/", clientv3.WithPrefix()),
	).Commit()
	cancel()
	if err != nil {
		return 0, fmt.Errorf("ledger: read usage shards: %w", err)
	}
	type base struct {
		used, rev int64
	}
	bases := map[string]*base{} // by "period/bucket"
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
		bases[strings.TrimPrefix(string(kv.Key), c.l.opts.Prefix+"usage/")] = &base{used: n, rev: kv.ModRevision}
	}
	current := c.l.Period().Name
	seen := make(map[string]int64, len(c.shardsSeen))
	folded := 0
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		key := string(kv.Key)
		parts := strings.Split(strings.TrimPrefix(key, c.l.opts.Prefix+"ushard/"), "/")
		if len(parts) != 3 || (parts[0] == current && parts[2] == c.id) {
			continue // ours is written without a read
		}
		if parts[0] == current && c.shardsSeen[key] != kv.ModRevision {
			seen[key] = kv.ModRevision // written since the last fold
			continue
		}
		pb := parts[0] + "/" + parts[1]
		b := bases[pb]
		if b == nil {
			b = &base{}
			bases[pb] = b
		}
		n, _ := strconv.ParseInt(string(kv.Value), 10, 64)
		baseKey := c.l.usageKey(parts[0], parts[1])
		fctx, cancel := c.l.ctx(ctx)
		tr, err := c.l.cli.Txn(fctx).If(
			clientv3.Compare(clientv3.ModRevision(baseKey), "=", b.rev),
			clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision),
		).Then(clientv3.OpPut(baseKey, strconv.FormatInt(b.used+n, 10)), clientv3.OpDelete(key)).Commit()
		cancel()
		if err != nil {
			return folded, fmt.Errorf("ledger: fold usage shard %s: %w", key, err)
		}
		if !tr.Succeeded {
			// Written meanwhile, or the base was: the next fold sees it.
			delete(bases, pb)
			continue
		}
		b.used, b.rev = b.used+n, tr.Header.Revision
		folded++
	}
	c.shardsSeen = seen
	return folded, nil
}
