package allocator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.opentelemetry.io/otel/metric"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/auth"
	"github.com/bucketlb/bucketlb/pkg/backoff"
	"github.com/bucketlb/bucketlb/pkg/grpcserver"
	"github.com/bucketlb/bucketlb/pkg/health"
	"github.com/bucketlb/bucketlb/pkg/health/probe"
	"github.com/bucketlb/bucketlb/pkg/leader"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/placement"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

// Config configures an allocator replica.
type Config struct {
	// Buckets are seeds written to etcd once per cluster.
	Buckets []*adminv1.BucketSpec
	// AdminToken guards the AdminService. Required.
	AdminToken string
	// ServiceToken guards the AllocatorService, which the upload service
	// calls: without it anyone who reaches the port could cool buckets
	// down, hold their room or read upload records. Required, and not
	// the admin token: upload pods must not hold admin rights. Both may
	// list several tokens, separated by white space, any of which is
	// taken (a rotation, see auth.First).
	ServiceToken string
	// ReservationTTL is a reservation's life without renewal; default 30s.
	ReservationTTL time.Duration
	// CommitMarkerTTL and IdempotencyTTL keep commit markers and upload
	// records; defaults in ledger.Options (1h, 24h).
	CommitMarkerTTL, IdempotencyTTL time.Duration
	// Strategy is the default placement strategy.
	Strategy allocatorv1.Strategy
	// ResetDay is the UTC day of month usage resets; default 1.
	ResetDay int
	// Prefix of all etcd keys; default "/bucketlb/".
	Prefix string
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Health tunes cooldowns.
	Health health.Policy
	// Rand seeds the random strategies; nil picks a random seed.
	Rand *rand.Rand
	// ProbeStore, if set, lets the elected leader HEAD every bucket that
	// is not DISABLED through it every ProbeEvery (default 30s), each probe
	// bounded by ProbeTimeout (default 5s). It needs the buckets'
	// credentials, like the upload service.
	ProbeStore               *objstore.Store
	ProbeEvery, ProbeTimeout time.Duration
	// Identity names this replica in the leader election and in its
	// capacity blocks; default random.
	Identity string
	// Metrics records reservations and commits; nil records nothing.
	Metrics *telemetry.Metrics
	// ReplicaLeaseTTL bounds how long a dead replica's capacity blocks and
	// reservations outlive it; default 10s, which also replaces anything
	// under 2s (etcd lengthens shorter leases to its own minimum anyway).
	ReplicaLeaseTTL time.Duration
}

// Server is one allocator replica.
type Server struct {
	allocatorv1.UnsafeAllocatorServiceServer
	adminv1.UnsafeAdminServiceServer

	cfg        Config
	log        *slog.Logger
	ledger     *ledger.Ledger
	health     *health.Store
	auth       auth.Guards
	strategies map[allocatorv1.Strategy]placement.Strategy

	buckets  atomic.Pointer[map[string]*adminv1.BucketSpec]
	elector  *leader.Elector
	capacity *ledger.Capacity
	usage    atomic.Pointer[usageView]
	// observers publish the gauges; Close removes them.
	observers []metric.Registration
}

// usageView is a recent read of every bucket's usage, for placement. The
// ledger enforces capacity exactly; placement only needs an estimate. But
// an estimate from a period that has ended, or from before an operator
// reset or corrected usage, would refuse uploads as if no room were left
// this period (a non-retryable answer): such a view is read again at once.
type usageView struct {
	at          time.Time
	period      string
	corrections uint64 // Capacity.UsageCorrections before the read
	stale       bool   // this replica changed usage since (markUsageStale)
	usage       map[string]ledger.Usage
}

// markUsageStale makes the next Allocate read usage again, while the
// gauges go on showing the last read.
func (s *Server) markUsageStale() {
	if v := s.usage.Load(); v != nil && !v.stale {
		c := *v
		c.stale = true
		s.usage.CompareAndSwap(v, &c)
	}
}

// current reports whether v may still answer.
func (s *Server) current(v *usageView) bool {
	return v != nil && !v.stale && time.Since(v.at) < 2*time.Second && v.period == s.ledger.Period().Name &&
		v.corrections == s.capacity.UsageCorrections()
}

// readUsage reads every bucket's usage and keeps it as the view.
func (s *Server) readUsage(ctx context.Context) (map[string]ledger.Usage, error) {
	corrections := s.capacity.UsageCorrections()
	u, p, err := s.ledger.Usages(ctx)
	if err != nil {
		return nil, err
	}
	s.usage.Store(&usageView{at: time.Now(), period: p.Name, corrections: corrections, usage: u})
	return u, nil
}

// New builds a replica and seeds the configured buckets once per cluster.
func New(ctx context.Context, cli *clientv3.Client, cfg Config, log *slog.Logger) (*Server, error) {
	if cfg.AdminToken == "" {
		return nil, fmt.Errorf("allocator: an admin token is required")
	}
	if cfg.ServiceToken == "" {
		return nil, fmt.Errorf("allocator: a service token is required")
	}
	for _, t := range strings.Fields(cfg.ServiceToken) {
		if slices.Contains(strings.Fields(cfg.AdminToken), t) {
			return nil, fmt.Errorf("allocator: the service token must differ from the admin token, or every upload pod holds admin rights")
		}
	}
	if cfg.ReservationTTL == 0 {
		cfg.ReservationTTL = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Strategy == allocatorv1.Strategy_STRATEGY_UNSPECIFIED {
		cfg.Strategy = allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST
	}
	s := &Server{
		cfg: cfg,
		log: log,
		ledger: ledger.New(cli, ledger.Options{Prefix: cfg.Prefix, ResetDay: cfg.ResetDay, Now: cfg.Now,
			CommitMarkerTTL: cfg.CommitMarkerTTL, IdempotencyTTL: cfg.IdempotencyTTL}),
		health: health.NewStore(cli, cfg.Prefix, cfg.Now, cfg.Health),
		auth: auth.Guards{
			auth.NewBearer("admin", "/"+adminv1.AdminService_ServiceDesc.ServiceName+"/", cfg.AdminToken),
			auth.NewBearer("service", "/"+allocatorv1.AllocatorService_ServiceDesc.ServiceName+"/", cfg.ServiceToken),
		},
		strategies: map[allocatorv1.Strategy]placement.Strategy{},
	}
	if cfg.ProbeEvery == 0 {
		cfg.ProbeEvery = 30 * time.Second
	}
	if cfg.Identity == "" {
		cfg.Identity = ledger.NewReservationID()
	}
	s.cfg = cfg
	var jobs []leader.Job
	if cfg.ProbeStore != nil {
		job := &probe.Job{
			Health:  s.health,
			Prober:  probe.ReadProber{Store: cfg.ProbeStore, Target: s.probeTarget},
			Buckets: s.probeBuckets,
			Timeout: cfg.ProbeTimeout,
			Log:     log,
		}
		jobs = append(jobs, leader.Job{Name: "probe", Every: cfg.ProbeEvery, Run: job.Run})
	}
	prefix := cfg.Prefix
	if prefix == "" {
		prefix = "/bucketlb/"
	}
	s.elector = leader.New(cli, prefix+"leader", cfg.Identity, 5, jobs, log)
	s.capacity = s.ledger.NewCapacity(cfg.Identity, cfg.ReplicaLeaseTTL, log)
	for k := range allocatorv1.Strategy_name {
		kind := allocatorv1.Strategy(k)
		st, err := placement.New(kind, cfg.Rand)
		if err != nil {
			return nil, err
		}
		s.strategies[kind] = st
	}
	// etcd may still be coming up (its StatefulSet forming beside the
	// allocators): keep trying until ctx ends rather than exit at once.
	for attempt := 0; ; attempt++ {
		err := s.ledger.AgreeResetDay(ctx)
		if err == nil {
			err = s.loadBuckets(ctx, cfg.Buckets)
		}
		if err == nil {
			break
		}
		if errors.Is(err, ledger.ErrResetDayMismatch) || errors.Is(err, ledger.ErrInvalid) {
			return nil, fmt.Errorf("allocator: %w", err) // no retry mends it
		}
		if werr := backoff.Wait(ctx, 250*time.Millisecond, attempt); werr != nil {
			if errors.Is(werr, context.Canceled) {
				return nil, fmt.Errorf("allocator: stopped while waiting for etcd at %s: %w", strings.Join(cli.Endpoints(), ", "), err)
			}
			return nil, fmt.Errorf("allocator: etcd at %s did not answer before the start deadline: %w", strings.Join(cli.Endpoints(), ", "), err)
		}
		log.Warn("waiting for etcd", "endpoints", cli.Endpoints(), "error", err.Error())
	}
	if err := s.observe(); err != nil {
		return nil, fmt.Errorf("allocator: register gauges: %w", err)
	}
	return s, nil
}

// loadBuckets seeds the configured buckets (the first time for the
// cluster) and loads the bucket list.
func (s *Server) loadBuckets(ctx context.Context, configured []*adminv1.BucketSpec) error {
	if len(configured) > 0 {
		wrote, kept, err := s.ledger.SeedBuckets(ctx, configured)
		if err != nil {
			return fmt.Errorf("seed buckets: %w", err)
		}
		if wrote {
			s.log.Info("seeded buckets from configuration", "count", len(configured)-len(kept))
		}
		if len(kept) > 0 {
			s.log.Warn("configured buckets already stored through the admin API were kept as stored", "buckets", kept)
		}
	}
	specs, _, err := s.ledger.ListBuckets(ctx)
	if err != nil {
		return fmt.Errorf("load buckets: %w", err)
	}
	s.logUnseeded(configured, specs)
	s.setBuckets(specs)
	return nil
}

// logUnseeded tells an operator who added a bucket to the configuration,
// or changed one, after the cluster's first seeding that etcd did not
// take it: the configuration seeds once, the admin API changes buckets.
func (s *Server) logUnseeded(configured, stored []*adminv1.BucketSpec) {
	byID := make(map[string]*adminv1.BucketSpec, len(stored))
	for _, b := range stored {
		byID[b.GetId()] = b
	}
	var missing, differ []string
	for _, c := range configured {
		switch b, ok := byID[c.GetId()]; {
		case !ok:
			missing = append(missing, c.GetId())
		case !proto.Equal(b, c):
			differ = append(differ, c.GetId())
		}
	}
	if len(missing) > 0 {
		s.log.Warn("configured buckets are not in etcd and were not added: the configuration seeds buckets once per cluster; add them with the admin API (bucketctl buckets put)",
			"buckets", missing)
	}
	if len(differ) > 0 {
		s.log.Info("configured buckets differ from etcd, which wins: change them with the admin API", "buckets", differ)
	}
}

// Register adds the AllocatorService and AdminService to r.
func (s *Server) Register(r grpc.ServiceRegistrar) {
	allocatorv1.RegisterAllocatorServiceServer(r, s)
	adminv1.RegisterAdminServiceServer(r, s)
}

// Interceptors return the interceptors that check the admin and service
// tokens; install them on the gRPC server that serves Register's services.
func (s *Server) Interceptors() (grpc.UnaryServerInterceptor, grpc.StreamServerInterceptor) {
	return s.auth.Unary, s.auth.Stream
}

// Serve serves srv on lis until ctx ends, with Run going on until srv has
// drained and stopped: a call that reaches the replica during its drain
// (DrainDelay, then GracefulStop) still finds its capacity lease, instead
// of failing as if etcd were gone while clients retry on other replicas.
func (s *Server) Serve(ctx context.Context, srv *grpcserver.Server, lis net.Listener) error {
	runCtx, stopRun := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan error, 1)
	go func() { done <- s.Run(runCtx) }()
	err := srv.Serve(ctx, lis)
	stopRun()
	return errors.Join(err, <-done)
}

// Run keeps the bucket and health caches current until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Add(5)
	go func() {
		defer wg.Done()
		_ = s.capacity.Run(ctx)
	}()
	go func() {
		defer wg.Done()
		s.refreshUsage(ctx)
	}()
	go func() {
		defer wg.Done()
		_ = s.elector.Run(ctx)
	}()
	go func() {
		defer wg.Done()
		_ = s.ledger.WatchBuckets(ctx, s.setBuckets)
	}()
	go func() {
		defer wg.Done()
		_ = s.health.Run(ctx)
	}()
	wg.Wait()
	return nil
}

// Close removes the replica's gauges; the rest stops with Run.
func (s *Server) Close() error {
	var errs []error
	for _, r := range s.observers {
		errs = append(errs, r.Unregister())
	}
	return errors.Join(errs...)
}

// Leading reports whether this replica runs the periodic jobs.
func (s *Server) Leading() bool { return s.elector.Leading() }

// refreshUsage keeps the placement estimate recent.
func (s *Server) refreshUsage(ctx context.Context) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		_, _ = s.readUsage(ctx) // failing, Allocate reads for itself (fail closed)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// usages returns the placement estimate, reading etcd when it is stale
// (which also makes Allocate fail closed while etcd is unreachable).
func (s *Server) usages(ctx context.Context) (map[string]ledger.Usage, error) {
	if v := s.usage.Load(); s.current(v) {
		return v.usage, nil
	}
	return s.readUsage(ctx)
}

func (s *Server) setBuckets(specs []*adminv1.BucketSpec) {
	m := make(map[string]*adminv1.BucketSpec, len(specs))
	for _, b := range specs {
		m[b.GetId()] = b
	}
	s.buckets.Store(&m)
}

func (s *Server) bucketMap() map[string]*adminv1.BucketSpec {
	if p := s.buckets.Load(); p != nil {
		return *p
	}
	return nil
}

// bucket returns a spec from the cache, falling back to etcd for a bucket
// created a moment ago on another replica.
func (s *Server) bucket(ctx context.Context, id string) (*adminv1.BucketSpec, error) {
	if b, ok := s.bucketMap()[id]; ok {
		return b, nil
	}
	return s.ledger.GetBucket(ctx, id)
}

func sortedBuckets(m map[string]*adminv1.BucketSpec) []*adminv1.BucketSpec {
	out := make([]*adminv1.BucketSpec, 0, len(m))
	for _, b := range m {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetId() < out[j].GetId() })
	return out
}

// probeBuckets lists the buckets the leader probes: all but DISABLED ones.
func (s *Server) probeBuckets() []string {
	var ids []string
	for _, b := range sortedBuckets(s.bucketMap()) {
		if b.GetState() != adminv1.BucketState_BUCKET_STATE_DISABLED {
			ids = append(ids, b.GetId())
		}
	}
	return ids
}

func (s *Server) probeTarget(id string) (objstore.Target, bool) {
	b, ok := s.bucketMap()[id]
	if !ok {
		return objstore.Target{}, false
	}
	return objstore.Target{ID: b.GetId(), Name: b.GetName(), Endpoint: b.GetEndpoint(), Region: b.GetRegion(),
		CredentialsRef: b.GetCredentialsRef(), PathStyle: b.GetPathStyle()}, true
}

func target(b *adminv1.BucketSpec) *allocatorv1.BucketTarget {
	return &allocatorv1.BucketTarget{
		Id: b.GetId(), Name: b.GetName(), Endpoint: b.GetEndpoint(), Region: b.GetRegion(),
		CredentialsRef: b.GetCredentialsRef(), PublicUrl: b.GetPublicUrl(), PathStyle: b.GetPathStyle(),
	}
}
