package allocator

import (
	"context"
	"errors"
	"fmt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"net/url"
	"slices"
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protojson"

	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/errinfo"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/objectkey"
	"github.com/bucketlb/bucketlb/pkg/placement"
)

// Allocate implements AllocatorService.
func (s *Server) Allocate(ctx context.Context, req *allocatorv1.AllocateRequest) (*allocatorv1.AllocateResponse, error) {
	res, b, err := s.allocate(ctx, req)
	if err != nil {
		// The metric classifies by the status the caller gets (no room is
		// "exhausted"), which a domain error does not carry.
		err = toStatus(ctx, err)
	}
	s.cfg.Metrics.RecordReservation(ctx, b.GetId(), err)
	if err != nil {
		return nil, err
	}
	return &allocatorv1.AllocateResponse{
		ReservationId: res.ID, Bucket: target(b), ReservedBytes: res.Size,
		ExpiresAt: timestamppb.New(res.ExpiresAt), Period: res.Period,
	}, nil
}

func (s *Server) allocate(ctx context.Context, req *allocatorv1.AllocateRequest) (*ledger.Reservation, *adminv1.BucketSpec, error) {
	if req.GetSize() <= 0 {
		return nil, nil, fmt.Errorf("%w: size must be a positive number of bytes, got %d", errInvalid, req.GetSize())
	}
	kind := req.GetStrategy()
	if kind == allocatorv1.Strategy_STRATEGY_UNSPECIFIED {
		kind = s.cfg.Strategy
	}
	strategy, ok := s.strategies[kind]
	if !ok {
		return nil, nil, fmt.Errorf("%w: unknown strategy %v", errInvalid, kind)
	}
	if cl := req.GetClaim(); cl != nil {
		// Before any capacity is held: a second upload under the key is
		// turned away without a reservation to give back.
		if _, err := s.capacity.Claim(ctx, cl.GetIdempotencyKey(), cl.GetToken(), s.cfg.ReservationTTL); err != nil {
			return nil, nil, err
		}
	}
	usage, err := s.usages(ctx)
	if err != nil {
		return nil, nil, err
	}
	now := s.cfg.Now()
	policy := s.health.Policy()
	var cands []placement.Candidate
	specs := map[string]*adminv1.BucketSpec{}
	healthyExists := false
	var why skipped
	buckets := sortedBuckets(s.bucketMap())
	roomThisPeriod := roomLeft(buckets, usage, req.GetSize())
	for _, b := range buckets {
		if b.GetState() != adminv1.BucketState_BUCKET_STATE_ACTIVE {
			why.add(strings.ToLower(strings.TrimPrefix(b.GetState().String(), "BUCKET_STATE_")))
			continue
		}
		if slices.Contains(req.GetExcludeBucketIds(), b.GetId()) {
			why.add(excluded)
			continue
		}
		rec, _ := s.health.Cached(b.GetId())
		if rec.CoolingDown(now, policy) {
			why.add("cooling down")
			continue
		}
		healthyExists = true
		u := usage[b.GetId()]
		// Committed bytes alone decide here: capacity held in blocks may be
		// this replica's own. Reserve enforces the exact limit.
		if !fits(b, u, req.GetSize()) {
			continue
		}
		specs[b.GetId()] = b
		cands = append(cands, placement.Candidate{
			ID: b.GetId(), Priority: b.GetPriority(), Weight: b.GetWeight(),
			LimitBytes: b.GetMonthlyLimitBytes(), UsedBytes: u.Used + u.Reserved, LatencyEWMA: rec.Latency(),
		})
	}
	if !healthyExists {
		if why.counts["cooling down"] == 0 && why.counts[excluded] == 0 {
			// Taken out of service by an operator, all of them: a retry
			// cannot help, unlike with a cooldown that ends by itself.
			return nil, nil, fmt.Errorf("%w (of %d buckets: %s)", errNoBucketInService, len(buckets), why)
		}
		return nil, nil, fmt.Errorf("%w (of %d buckets: %s)", errNoHealthyBucket, len(buckets), why)
	}
	ranked := strategy.Rank(placement.Request{Size: req.GetSize(), AffinityKey: req.GetAffinityKey()}, cands)
	trialsOut := 0
	for _, c := range ranked {
		b := specs[c.ID]
		// Half-open buckets admit exactly one trial across all replicas.
		if ok, err := s.health.Admit(ctx, c.ID); err != nil {
			return nil, nil, err
		} else if !ok {
			trialsOut++
			continue
		}
		res, err := s.capacity.Reserve(ctx, b, req.GetSize(), s.cfg.ReservationTTL)
		if err != nil {
			// A half-open trial we claimed but cannot use goes back at once
			// instead of blocking the bucket until the trial times out.
			if rec, _ := s.health.Cached(c.ID); rec.HalfOpen(s.cfg.Now(), policy) {
				if aerr := s.health.AbandonTrial(context.WithoutCancel(ctx), c.ID); aerr != nil {
					s.log.Warn("could not give back a half-open trial", "bucket", c.ID, "error", aerr.Error())
				}
			}
		}
		if errors.Is(err, ledger.ErrNoRoom) {
			continue // another replica took the room meanwhile
		}
		if err != nil {
			return nil, nil, err
		}
		if rec, _ := s.health.Cached(c.ID); rec.HalfOpen(s.cfg.Now(), policy) {
			// This reservation is the trial: a Release of it, on any
			// replica, gives the trial back (the upload never wrote).
			if herr := s.health.HoldTrial(context.WithoutCancel(ctx), c.ID, res.ID); herr != nil {
				s.log.Warn("could not name a half-open trial's reservation", "bucket", c.ID, "error", herr.Error())
			}
		}
		return res, b, nil
	}
	if trialsOut > 0 {
		// Room may be there: a bucket waits for its one trial upload to
		// tell whether it has recovered. That is soon over, so the answer
		// is to retry shortly, not that capacity ran out.
		for range trialsOut {
			why.add("half-open with its one trial upload under way")
		}
		return nil, nil, fmt.Errorf("%w (of %d buckets: %s)", errNoHealthyBucket, len(buckets), why)
	}
	if roomThisPeriod {
		// The estimate of usage may predate the commits that took the
		// room (it is read every 200 ms): before telling the caller that
		// reservations hold it and a retry may find it, read usage again.
		if fresh, err := s.readUsage(ctx); err == nil {
			roomThisPeriod = roomLeft(buckets, fresh, req.GetSize())
		}
	}
	if !roomThisPeriod {
		// Only an operator, or the next period, makes room: a retry
		// would only wait.
		return nil, nil, errNoRoomThisPeriod
	}
	return nil, nil, errNoRoom
}

// fits reports whether size bytes fit in b beside its committed bytes
// (written so that no size overflows the sum).
func fits(b *adminv1.BucketSpec, u ledger.Usage, size int64) bool {
	return size <= b.GetMonthlyLimitBytes()-u.Used
}

// roomLeft reports whether an ACTIVE bucket's committed bytes leave room
// for size bytes this period.
func roomLeft(buckets []*adminv1.BucketSpec, usage map[string]ledger.Usage, size int64) bool {
	for _, b := range buckets {
		if b.GetState() == adminv1.BucketState_BUCKET_STATE_ACTIVE && fits(b, usage[b.GetId()], size) {
			return true
		}
	}
	return false
}

// excluded is the reason for a bucket the caller asked not to be given:
// the upload service excludes the buckets an upload already tried.
const excluded = "already tried by this upload"

// skipped counts why buckets could not take an upload, in the order the
// reasons first came up, for an error an operator can act on.
type skipped struct {
	reasons []string
	counts  map[string]int
}

func (k *skipped) add(reason string) {
	if k.counts == nil {
		k.counts = map[string]int{}
	}
	if k.counts[reason] == 0 {
		k.reasons = append(k.reasons, reason)
	}
	k.counts[reason]++
}

func (k skipped) String() string {
	if len(k.reasons) == 0 {
		return "none configured"
	}
	parts := make([]string, len(k.reasons))
	for i, r := range k.reasons {
		parts[i] = fmt.Sprintf("%d %s", k.counts[r], r)
	}
	return strings.Join(parts, ", ")
}

// Renew implements AllocatorService.
func (s *Server) Renew(ctx context.Context, req *allocatorv1.RenewRequest) (*allocatorv1.RenewResponse, error) {
	b, err := s.bucket(ctx, req.GetBucketId())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	if err := changedUnder(b, req.GetBucketName(), req.GetEndpoint()); err != nil {
		return nil, toStatus(ctx, err)
	}
	exp, re, err := s.capacity.Renew(ctx, b, req.GetReservationId(), req.GetReservedBytes(), s.cfg.ReservationTTL)
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	// A long upload on a half-open bucket keeps its one trial out.
	if err := s.health.ExtendTrial(ctx, b.GetId()); err != nil {
		s.log.Warn("could not keep a half-open trial out", "bucket", b.GetId(), "error", err.Error())
	}
	if cl := req.GetClaim(); cl != nil {
		_, err := s.capacity.Claim(ctx, cl.GetIdempotencyKey(), cl.GetToken(), s.cfg.ReservationTTL)
		if errors.Is(err, ledger.ErrRecorded) {
			// The claim lapsed and another upload under the key finished:
			// its object stands under the client's key, which this one's
			// writes would replace. Both must not write: this one stops.
			return nil, status.Error(codes.Aborted, "another upload under this idempotency key finished while this one's hold on the key had lapsed; this upload must stop: retry to get that upload's result")
		}
		if err != nil {
			return nil, toStatus(ctx, err)
		}
	}
	if re {
		s.log.Info("re-established a lapsed reservation", "reservation", req.GetReservationId(), "bucket", b.GetId())
	}
	return &allocatorv1.RenewResponse{ExpiresAt: timestamppb.New(exp), Reestablished: re}, nil
}

// changedUnder reports an upload granted bucket b, as S3 bucket name at
// endpoint, that can no longer be counted there: an operator disabled b,
// or pointed it at another S3 bucket or endpoint (a move), while the
// upload ran. Its success would name a bucket that serves nothing, or
// one that does not hold the object. DRAINING is no change: running
// uploads finish. Empty name and endpoint (older callers) are not
// compared.
func changedUnder(b *adminv1.BucketSpec, name, endpoint string) error {
	switch {
	case b.GetState() == adminv1.BucketState_BUCKET_STATE_DISABLED:
		return &bucketChanged{fmt.Sprintf("bucket %s was disabled by an operator during the upload", b.GetId())}
	case name != "" && name != b.GetName():
		return &bucketChanged{fmt.Sprintf("bucket %s was pointed at S3 bucket %q by an operator during the upload, which wrote to %q", b.GetId(), b.GetName(), name)}
	case endpoint != "" && !sameEndpoint(endpoint, b.GetEndpoint()):
		return &bucketChanged{fmt.Sprintf("bucket %s was pointed at another endpoint by an operator during the upload", b.GetId())}
	}
	return nil
}

// sameEndpoint reports whether two endpoint URLs name the same place, as
// a client reaches it: an operator's edit that only changes how it is
// written (case, a trailing slash, the scheme's default port) must not
// stop every upload running on the bucket.
func sameEndpoint(a, b string) bool {
	if a == b {
		return true
	}
	ua, erra := url.Parse(a)
	ub, errb := url.Parse(b)
	if erra != nil || errb != nil {
		return false
	}
	port := func(u *url.URL) string {
		if p := u.Port(); p != "" {
			return p
		}
		return map[string]string{"http": "80", "https": "443"}[strings.ToLower(u.Scheme)]
	}
	return strings.EqualFold(ua.Scheme, ub.Scheme) && strings.EqualFold(ua.Hostname(), ub.Hostname()) && port(ua) == port(ub) &&
		strings.TrimRight(ua.EscapedPath(), "/") == strings.TrimRight(ub.EscapedPath(), "/")
}

// Commit implements AllocatorService.
func (s *Server) Commit(ctx context.Context, req *allocatorv1.CommitRequest) (*allocatorv1.CommitResponse, error) {
	if req.GetReservedBytes() > 0 && req.GetSize() > req.GetReservedBytes() {
		return nil, toStatus(ctx, fmt.Errorf("%w: committed size %d exceeds the %d bytes reserved", errInvalid, req.GetSize(), req.GetReservedBytes()))
	}
	b, err := s.bucket(ctx, req.GetBucketId())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	if err := changedUnder(b, req.GetBucketName(), req.GetEndpoint()); err != nil {
		// A retry of a commit that applied before the change gets the
		// answer it would have had; any other commit is refused.
		done, merr := s.ledger.Committed(ctx, req.GetReservationId())
		if merr != nil {
			return nil, toStatus(ctx, merr)
		}
		if !done {
			return nil, errinfo.MarkNotApplied(ctx, status.Convert(toStatus(ctx, err))).Err()
		}
	}
	var idem *ledger.Idempotency
	if k := req.GetIdempotencyKey(); k != "" {
		rec, err := protojson.Marshal(&allocatorv1.UploadRecord{
			BucketId: b.GetId(), BucketName: b.GetName(), Key: req.GetKey(), PublicUrl: objectkey.PublicURL(b.GetPublicUrl(), req.GetKey()),
			Size: req.GetSize(), Sha256: req.GetSha256(), Etag: req.GetEtag(),
		})
		if err != nil {
			return nil, toStatus(ctx, err)
		}
		idem = &ledger.Idempotency{Key: k, Record: rec}
	}
	res, err := s.capacity.Commit(ctx, b, req.GetReservationId(), req.GetSize(), idem)
	if err != nil {
		// Capacity.Commit answers out of space only once it has read
		// that the commit did not apply.
		settled := ledger.IsNoSpace(err)
		if err = toStatus(ctx, err); settled {
			err = errinfo.MarkNotApplied(ctx, status.Convert(err)).Err()
		}
	}
	s.cfg.Metrics.RecordCommit(ctx, b.GetId(), res.AlreadyCommitted || res.DuplicateOf != nil, err)
	if err != nil {
		return nil, err
	}
	if lat := req.GetWriteLatency(); lat != nil && !res.AlreadyCommitted {
		// The write succeeded whatever the ledger answered; health is
		// advisory, so a failure to record it does not fail the commit.
		if _, herr := s.health.Report(context.WithoutCancel(ctx), b.GetId(), true, lat.AsDuration()); herr != nil {
			s.log.Warn("could not record the write's success", "bucket", b.GetId(), "error", herr.Error())
		}
	}
	if res.DuplicateOf != nil {
		first := &allocatorv1.UploadRecord{}
		if err := protojson.Unmarshal(res.DuplicateOf, first); err != nil {
			return nil, toStatus(ctx, err)
		}
		return &allocatorv1.CommitResponse{DuplicateOf: first}, nil
	}
	// The replica's view may lag this commit by a moment, so the commit's
	// size is added to it. A repeated commit may be in the view already:
	// its answer is read afresh (retries are rare), not counted twice.
	// Either is of the period the bytes were counted in, which a commit
	// retried after the period turned does not share with the view.
	used := res.Size
	v := s.usage.Load()
	if v != nil && v.period == res.Period {
		used += v.usage[b.GetId()].Used
	}
	if res.AlreadyCommitted || v == nil || v.period != res.Period {
		if u, err := s.ledger.UsedIn(ctx, res.Period, b.GetId()); err == nil {
			used = u
		}
	}
	return &allocatorv1.CommitResponse{AlreadyCommitted: res.AlreadyCommitted, Period: res.Period, UsedBytes: used}, nil
}

// GetUploadRecord implements AllocatorService.
func (s *Server) GetUploadRecord(ctx context.Context, req *allocatorv1.GetUploadRecordRequest) (*allocatorv1.GetUploadRecordResponse, error) {
	if req.GetIdempotencyKey() == "" {
		return nil, toStatus(ctx, fmt.Errorf("%w: idempotency_key is required", errInvalid))
	}
	data, ok, err := s.ledger.UploadRecord(ctx, req.GetIdempotencyKey())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	if !ok {
		return nil, toStatus(ctx, errNoRecord)
	}
	rec := &allocatorv1.UploadRecord{}
	if err := protojson.Unmarshal(data, rec); err != nil {
		return nil, toStatus(ctx, err)
	}
	return &allocatorv1.GetUploadRecordResponse{Record: rec}, nil
}

// EndClaim implements AllocatorService.
func (s *Server) EndClaim(ctx context.Context, req *allocatorv1.EndClaimRequest) (*allocatorv1.EndClaimResponse, error) {
	if err := s.capacity.EndClaim(ctx, req.GetClaim().GetIdempotencyKey(), req.GetClaim().GetToken()); err != nil {
		return nil, toStatus(ctx, err)
	}
	return &allocatorv1.EndClaimResponse{}, nil
}

// Release implements AllocatorService.
func (s *Server) Release(ctx context.Context, req *allocatorv1.ReleaseRequest) (*allocatorv1.ReleaseResponse, error) {
	if err := s.capacity.Release(ctx, req.GetBucketId(), req.GetReservationId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	// A half-open trial whose reservation goes unused (the upload never
	// wrote: no keys on its replica, a client gone) goes back at once,
	// instead of keeping the bucket from every upload for TrialTimeout.
	if rec, known := s.health.Cached(req.GetBucketId()); known && !rec.Healthy(s.health.Policy()) {
		if err := s.health.ReleaseTrial(context.WithoutCancel(ctx), req.GetBucketId(), req.GetReservationId()); err != nil {
			s.log.Warn("could not give back a half-open trial", "bucket", req.GetBucketId(), "error", err.Error())
		}
	}
	return &allocatorv1.ReleaseResponse{}, nil
}

// ReportOutcome implements AllocatorService.
func (s *Server) ReportOutcome(ctx context.Context, req *allocatorv1.ReportOutcomeRequest) (*allocatorv1.ReportOutcomeResponse, error) {
	if _, known := allocatorv1.Outcome_name[int32(req.GetOutcome())]; !known || req.GetOutcome() == allocatorv1.Outcome_OUTCOME_UNSPECIFIED || req.GetBucketId() == "" {
		return nil, toStatus(ctx, fmt.Errorf("%w: bucket_id and an outcome (SUCCESS, ERROR, THROTTLED or TIMEOUT) are required", errInvalid))
	}
	// Health is kept for known buckets only: a report for any other id
	// would leave a record under it in etcd.
	if _, err := s.bucket(ctx, req.GetBucketId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	ok := req.GetOutcome() == allocatorv1.Outcome_OUTCOME_SUCCESS
	rec, err := s.health.Report(ctx, req.GetBucketId(), ok, req.GetLatency().AsDuration())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	if !ok {
		s.log.Warn("bucket request failed", "bucket", req.GetBucketId(), "outcome", req.GetOutcome().String(),
			"error", clip(req.GetError(), maxLoggedError), "consecutive_failures", rec.Failures)
	}
	out := &allocatorv1.ReportOutcomeResponse{HealthScore: int32(rec.Score()), ConsecutiveFailures: int32(rec.Failures)}
	if rec.CoolingDown(s.cfg.Now(), s.health.Policy()) {
		out.CooldownUntil = timestamppb.New(rec.CooldownUntil)
	}
	return out, nil
}

// maxLoggedError bounds the error text a report puts in one log line.
const maxLoggedError = 1024

// clip cuts s to at most n bytes, on a UTF-8 boundary, marking the cut.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "… (cut)"
}

// LookupBucket implements AllocatorService.
func (s *Server) LookupBucket(ctx context.Context, req *allocatorv1.LookupBucketRequest) (*allocatorv1.LookupBucketResponse, error) {
	b, err := s.bucket(ctx, req.GetBucketId())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	if b.GetState() == adminv1.BucketState_BUCKET_STATE_DISABLED {
		// Unlike DRAINING, DISABLED takes nothing: an operator stops all
		// traffic to a bucket (revoked keys, a closed account) this way.
		return nil, toStatus(ctx, fmt.Errorf("%w: bucket %s serves no reads or deletes while DISABLED; an operator can set it DRAINING to serve them without taking uploads", errDisabled, b.GetId()))
	}
	return &allocatorv1.LookupBucketResponse{Bucket: target(b)}, nil
}
