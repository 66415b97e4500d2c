// Package leader elects one replica through etcd (concurrency.Election)
// and runs periodic jobs only while it leads. When its session is lost
// (lease expired, etcd partitioned away) it stops acting at once and
// campaigns again; on shutdown it resigns so another replica takes over
// without waiting for the lease to expire.
package leader

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Job is a periodic task of the leader.
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

// New returns an elector for the election under key. ttl is the session
// lease in seconds: how long a dead leader keeps leading.
func New(cli *clientv3.Client, key, identity string, ttl int, jobs []Job, log *slog.Logger) *Elector {
	if ttl < 2 {
		ttl = 2
	}
	return &Elector{cli: cli, key: key, identity: identity, ttl: ttl, jobs: jobs, log: log}
}

// Leading reports whether this replica currently leads.
func (e *Elector) Leading() bool { return e.leading.Load() }

// Run campaigns until ctx ends.
func (e *Elector) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		if err := e.term(ctx); err != nil && ctx.Err() == nil {
			e.log.Warn("leader election interrupted; campaigning again", "error", err.Error())
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
	return nil
}

// term is one session: campaign, lead until the session or ctx ends.
func (e *Elector) term(ctx context.Context) error {
	sess, err := concurrency.NewSession(e.cli, concurrency.WithTTL(e.ttl), concurrency.WithContext(ctx))
	if err != nil {
		return err
	}
	defer sess.Close()
	el := concurrency.NewElection(sess, e.key)
	if err := el.Campaign(ctx, e.identity); err != nil {
		return err
	}
	e.leading.Store(true)
	e.log.Info("became leader; running periodic jobs", "identity", e.identity)
	jctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, j := range e.jobs {
		wg.Add(1)
		go func(j Job) {
			defer wg.Done()
			t := time.NewTicker(j.Every)
			defer t.Stop()
			for {
				j.Run(jctx)
				select {
				case <-jctx.Done():
					return
				case <-t.C:
				}
			}
		}(j)
	}
	select {
	case <-ctx.Done():
	case <-sess.Done(): // lease lost: another replica may lead already
	}
	cancel()
	wg.Wait()
	e.leading.Store(false)
	rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer rcancel()
	_ = el.Resign(rctx)
	e.log.Info("stopped leading", "identity", e.identity)
	return nil
}
