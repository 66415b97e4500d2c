package leader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Job is a periodic task of the leader. Run is called once when this
// replica becomes leader and then every Every, never concurrently with
// itself; its context ends when leadership does.
type Job struct {
	Name  string
	Every time.Duration
	Run   func(ctx context.Context)
}

// Elector campaigns and runs jobs while leading.
type Elector struct {
	cli      *clientv3.Client
	key      string
	identity string
	ttl      int
	jobs     []Job
	log      *slog.Logger
	leading  atomic.Bool
}

// retryWait is the pause between terms that ended in an error.
const retryWait = time.Second

// New returns an elector for the election under key. identity names this
// replica in the election. ttl is the session lease in seconds (minimum 2):
// how long a dead leader keeps leading. log may be nil.
func New(cli *clientv3.Client, key, identity string, ttl int, jobs []Job, log *slog.Logger) *Elector {
	if ttl < 2 {
		ttl = 2
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Elector{cli: cli, key: key, identity: identity, ttl: ttl, jobs: jobs, log: log}
}

// Leading reports whether this replica currently leads. Once it reports
// false after leading, every job has returned.
func (e *Elector) Leading() bool { return e.leading.Load() }

// Run campaigns, leads and campaigns again after a lost session, until ctx
// ends. It returns nil when ctx ends, after resigning.
func (e *Elector) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		if err := e.term(ctx); err != nil && ctx.Err() == nil {
			e.log.Warn("leader election interrupted; campaigning again", "identity", e.identity, "error", err.Error())
			select {
			case <-ctx.Done():
			case <-time.After(retryWait):
			}
		}
	}
	return nil
}

// term is one session: campaign, then lead until the session or ctx ends.
func (e *Elector) term(ctx context.Context) error {
	gctx, cancel := context.WithTimeout(ctx, time.Duration(e.ttl)*time.Second)
	lease, err := e.cli.Grant(gctx, int64(e.ttl))
	cancel()
	if err != nil {
		return fmt.Errorf("leader: grant session lease: %w", err)
	}
	// The session outlives ctx so that Close can still revoke the lease on
	// shutdown; it is closed when the term ends.
	sctx, scancel := context.WithCancel(context.WithoutCancel(ctx))
	defer scancel()
	sess, err := concurrency.NewSession(e.cli, concurrency.WithLease(lease.ID), concurrency.WithTTL(e.ttl), concurrency.WithContext(sctx))
	if err != nil {
		return fmt.Errorf("leader: session: %w", err)
	}
	defer sess.Close() // revokes the lease, bounded by the TTL
	el := concurrency.NewElection(sess, e.key)
	// Campaign until elected, ctx ends or the session is lost.
	cctx, ccancel := context.WithCancel(ctx)
	defer ccancel()
	go func() {
		select {
		case <-sess.Done():
			ccancel()
		case <-cctx.Done():
		}
	}()
	// Campaign is not waited for once ctx ends: cancelled, it resigns on
	// the client's own context, which blocks for as long as etcd is
	// unreachable. It returns when etcd answers or the client is closed;
	// the session's lease, revoked or expiring, ends any key it left.
	campaign := make(chan error, 1)
	go func() { campaign <- el.Campaign(cctx, e.identity) }()
	select {
	case err = <-campaign:
	case <-ctx.Done():
		return nil
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("leader: campaign: %w", err)
	}
	// Campaign can return after the session died while it waited; make
	// sure our key is still there, under our lease.
	vctx, vcancel := context.WithTimeout(ctx, time.Duration(e.ttl)*time.Second)
	resp, err := e.cli.Get(vctx, el.Key())
	vcancel()
	if err != nil {
		return fmt.Errorf("leader: verify election key: %w", err)
	}
	if len(resp.Kvs) == 0 || resp.Kvs[0].Lease != int64(sess.Lease()) {
		return errors.New("leader: session lost while campaigning")
	}
	e.lead(ctx, sess)
	if ctx.Err() != nil {
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer rcancel()
		if err := el.Resign(rctx); err != nil {
			e.log.Warn("could not resign leadership; another replica takes over when the lease expires", "identity", e.identity, "error", err.Error())
		}
		return nil
	}
	return errors.New("leader: session lost; another replica may lead now")
}

// lead runs the jobs until ctx ends or the session is lost.
func (e *Elector) lead(ctx context.Context, sess *concurrency.Session) {
	e.log.Info("became leader; running periodic jobs", "identity", e.identity, "jobs", len(e.jobs))
	jctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	e.leading.Store(true)
	for _, j := range e.jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			every := j.Every
			if every <= 0 {
				every = time.Minute
			}
			t := time.NewTicker(every)
			defer t.Stop()
			for jctx.Err() == nil {
				j.Run(jctx)
				select {
				case <-jctx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}
	select {
	case <-ctx.Done():
	case <-sess.Done(): // lease lost: another replica may lead already
	}
	cancel()
	wg.Wait()
	e.leading.Store(false)
	e.log.Info("stopped leading", "identity", e.identity)
}

// Leader returns the identity of the replica that leads now, or "" when
// none does; any replica may ask (e.g. for an admin status page).
func (e *Elector) Leader(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	// Election keys are <key>/<lease>; the oldest one leads.
	resp, err := e.cli.Get(ctx, e.key+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return "", fmt.Errorf("leader: read election: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	return string(resp.Kvs[0].Value), nil
}
