package allocator

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/config"
	"github.com/bucketlb/bucketlb/pkg/ledger"
)

// ListBuckets implements AdminService.
func (s *Server) ListBuckets(ctx context.Context, _ *adminv1.ListBucketsRequest) (*adminv1.ListBucketsResponse, error) {
	specs, _, err := s.ledger.ListBuckets(ctx)
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	return &adminv1.ListBucketsResponse{Buckets: specs}, nil
}

// GetBucket implements AdminService.
func (s *Server) GetBucket(ctx context.Context, req *adminv1.GetBucketRequest) (*adminv1.GetBucketResponse, error) {
	if err := checkID("id", req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	b, err := s.ledger.GetBucket(ctx, req.GetId())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	return &adminv1.GetBucketResponse{Bucket: b}, nil
}

// PutBucket implements AdminService.
func (s *Server) PutBucket(ctx context.Context, req *adminv1.PutBucketRequest) (*adminv1.PutBucketResponse, error) {
	if req.GetBucket() == nil {
		return nil, toStatus(ctx, fmt.Errorf("%w: bucket is required", errInvalid))
	}
	if err := checkID("bucket.id", req.GetBucket().GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	paths := req.GetUpdateMask().GetPaths()
	fields := req.GetBucket().ProtoReflect().Descriptor().Fields()
	for _, p := range paths {
		if f := fields.ByName(protoreflect.Name(p)); f == nil || p == "id" {
			return nil, toStatus(ctx, fmt.Errorf("%w: update_mask path %q is not a field of a bucket spec that can change", errInvalid, p))
		}
	}
	spec, err := s.ledger.StoreBucket(ctx, req.GetBucket().GetId(), func(cur *adminv1.BucketSpec) (*adminv1.BucketSpec, error) {
		spec := proto.Clone(req.GetBucket()).(*adminv1.BucketSpec)
		if len(paths) > 0 {
			if cur == nil {
				return nil, fmt.Errorf("%w: %q", ledger.ErrBucketNotFound, spec.GetId())
			}
			spec = masked(cur, spec, paths)
		}
		if spec.GetState() == adminv1.BucketState_BUCKET_STATE_UNSPECIFIED && cur != nil {
			// A spec sent without a state (to fix an endpoint, say) keeps
			// the bucket's, as it is when the write applies: an
			// operator's DISABLED, even one set a moment before, must not
			// be undone by it.
			spec.State = cur.GetState()
		}
		config.FillDefaults(spec)
		if err := config.ValidateSpec(spec); err != nil {
			// Named as the request's field: bucket.monthly_limit_bytes.
			return nil, fmt.Errorf("%w: bucket.%v", errInvalid, err)
		}
		return spec, nil
	})
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	s.log.Info("bucket stored", "bucket", spec.GetId(), "state", spec.GetState().String())
	return &adminv1.PutBucketResponse{Bucket: spec}, nil
}

// masked is cur with the fields paths name (checked to exist) taken from
// spec. An endpoint derived from cur's account follows a new account, as
// it would for a spec put whole, keeping its jurisdiction (an EU or
// FedRAMP bucket's endpoint has .eu. or .fedramp. after the account).
func masked(cur, spec *adminv1.BucketSpec, paths []string) *adminv1.BucketSpec {
	out := proto.Clone(cur).(*adminv1.BucketSpec)
	src, dst := spec.ProtoReflect(), out.ProtoReflect()
	fields := src.Descriptor().Fields()
	for _, p := range paths {
		f := fields.ByName(protoreflect.Name(p))
		dst.Set(f, src.Get(f))
	}
	if slices.Contains(paths, "account_id") && !slices.Contains(paths, "endpoint") && cur.GetAccountId() != "" {
		if rest, ok := r2EndpointOf(cur.GetEndpoint(), cur.GetAccountId()); ok {
			out.Endpoint = ""
			if out.GetAccountId() != "" {
				out.Endpoint = "https://" + out.GetAccountId() + rest
			}
		}
	}
	return out
}

// r2EndpointOf reports whether endpoint is account's R2 endpoint, in any
// jurisdiction, and returns what follows the account in its host
// (".r2.cloudflarestorage.com", ".eu.r2.cloudflarestorage.com").
func r2EndpointOf(endpoint, account string) (string, bool) {
	e := strings.ToLower(strings.TrimSuffix(endpoint, "/"))
	rest, ok := strings.CutPrefix(e, "https://"+strings.ToLower(account)+".")
	if !ok || !strings.HasSuffix(rest, "r2.cloudflarestorage.com") || strings.ContainsAny(rest, "/:?#") {
		return "", false
	}
	return "." + rest, true
}

// DeleteBucket implements AdminService.
func (s *Server) DeleteBucket(ctx context.Context, req *adminv1.DeleteBucketRequest) (*adminv1.DeleteBucketResponse, error) {
	if err := checkID("id", req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	if err := s.ledger.DeleteBucket(ctx, req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	s.log.Info("bucket deleted", "bucket", req.GetId())
	// Its health goes with it: a bucket added later under the id (another
	// S3 bucket, say) must not start in the old one's cooldown.
	if err := s.health.Reset(ctx, req.GetId()); err != nil {
		s.log.Warn("could not remove a deleted bucket's health record", "bucket", req.GetId(), "error", err.Error())
	}
	return &adminv1.DeleteBucketResponse{}, nil
}

// SetBucketState implements AdminService.
func (s *Server) SetBucketState(ctx context.Context, req *adminv1.SetBucketStateRequest) (*adminv1.SetBucketStateResponse, error) {
	if err := checkID("id", req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	if !config.ValidState(req.GetState()) {
		return nil, toStatus(ctx, fmt.Errorf("%w: state must be ACTIVE, DRAINING or DISABLED", errInvalid))
	}
	b, err := s.ledger.UpdateBucket(ctx, req.GetId(), func(b *adminv1.BucketSpec) { b.State = req.GetState() })
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	s.log.Info("bucket state changed", "bucket", b.GetId(), "state", b.GetState().String())
	return &adminv1.SetBucketStateResponse{Bucket: b}, nil
}

// ResetHealth implements AdminService.
func (s *Server) ResetHealth(ctx context.Context, req *adminv1.ResetHealthRequest) (*adminv1.ResetHealthResponse, error) {
	if err := checkID("id", req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	if _, err := s.ledger.GetBucket(ctx, req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	if err := s.health.Reset(ctx, req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	return &adminv1.ResetHealthResponse{}, nil
}

// ResetUsage implements AdminService.
func (s *Server) ResetUsage(ctx context.Context, req *adminv1.ResetUsageRequest) (*adminv1.ResetUsageResponse, error) {
	if err := checkID("id", req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	prev, err := s.setUsage(ctx, req.GetId(), 0)
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	return &adminv1.ResetUsageResponse{PreviousUsedBytes: prev}, nil
}

// CorrectUsage implements AdminService.
func (s *Server) CorrectUsage(ctx context.Context, req *adminv1.CorrectUsageRequest) (*adminv1.CorrectUsageResponse, error) {
	if err := checkID("id", req.GetId()); err != nil {
		return nil, toStatus(ctx, err)
	}
	if req.GetUsedBytes() < 0 || req.GetUsedBytes() > config.MaxMonthlyLimit {
		return nil, toStatus(ctx, fmt.Errorf("%w: used_bytes must be between 0 and %d, got %d", errInvalid, int64(config.MaxMonthlyLimit), req.GetUsedBytes()))
	}
	prev, err := s.setUsage(ctx, req.GetId(), req.GetUsedBytes())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	return &adminv1.CorrectUsageResponse{PreviousUsedBytes: prev}, nil
}

func (s *Server) setUsage(ctx context.Context, id string, used int64) (int64, error) {
	if _, err := s.ledger.GetBucket(ctx, id); err != nil {
		return 0, err
	}
	prev, err := s.ledger.SetUsage(ctx, id, used)
	if err == nil {
		s.log.Info("bucket usage set by admin", "bucket", id, "previous_bytes", prev, "bytes", used)
	}
	// Whatever the outcome, this replica's estimate may be out of date
	// now; other replicas learn of it from their watch (UsageCorrections).
	s.markUsageStale()
	return prev, err
}

// GetStatus implements AdminService.
func (s *Server) GetStatus(ctx context.Context, _ *adminv1.GetStatusRequest) (*adminv1.GetStatusResponse, error) {
	specs, _, err := s.ledger.ListBuckets(ctx)
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	usage, period, err := s.ledger.Usages(ctx)
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	now := s.cfg.Now()
	policy := s.health.Policy()
	out := &adminv1.GetStatusResponse{
		Period: period.Name, PeriodStart: timestamppb.New(period.Start), PeriodEnd: timestamppb.New(period.End),
	}
	for _, b := range specs {
		u := usage[b.GetId()]
		rec, _ := s.health.Cached(b.GetId())
		st := &adminv1.BucketStatus{
			Bucket: b, LimitBytes: b.GetMonthlyLimitBytes(), UsedBytes: u.Used, ReservedBytes: u.Reserved,
			UtilizationPercent:  percent(u.Used+u.Reserved, b.GetMonthlyLimitBytes()),
			HealthScore:         int32(rec.Score()),
			ConsecutiveFailures: int32(rec.Failures),
			CoolingDown:         rec.CoolingDown(now, policy),
		}
		if st.CoolingDown {
			st.CooldownUntil = timestamppb.New(rec.CooldownUntil)
		}
		out.Buckets = append(out.Buckets, st)
		out.TotalLimitBytes += b.GetMonthlyLimitBytes()
		out.TotalUsedBytes += u.Used
		out.TotalReservedBytes += u.Reserved
	}
	out.TotalUtilizationPercent = percent(out.TotalUsedBytes+out.TotalReservedBytes, out.TotalLimitBytes)
	return out, nil
}

func percent(n, d int64) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) * 100 / float64(d)
}

// checkID refuses a bucket id no bucket can have (an empty one, say) as
// the request's fault, before it is looked up and answered NOT_FOUND.
func checkID(field, id string) error {
	if config.ValidBucketID(id) {
		return nil
	}
	return fmt.Errorf("%w: %s: %q must be %s", errInvalid, field, id, config.BucketIDRule)
}
