package allocator_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/ledger"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

// BenchmarkAllocator prints allocations/s on one hot bucket and over 16
// buckets, and allocate+commit cycles/s, beside two baselines measured on
// the same embedded etcd in the same run: plain Put with 64 writers and a
// single-key compare-and-swap with 32 writers. Each row alternates rounds
// with rounds of plain Put and is compared with those, so drift of the
// machine during the run (this VM's rates move by a fifth) falls on both.
func BenchmarkAllocator(b *testing.B) {
	srv, cli := testenv.Etcd(b)
	const d = 4 * time.Second
	const rounds, round = 2, 2 * time.Second
	ctx := context.Background()

	putLoad := func(d time.Duration) testenv.LoadResult {
		return testenv.Load(64, d, func(w, i int) error {
			_, err := cli.Put(ctx, fmt.Sprintf("/bench/put/%d/%d", w, i), "x")
			return err
		})
	}
	var allPuts []testenv.LoadResult
	// paired runs fn in rounds alternating with plain Put rounds and
	// returns both sides merged.
	paired := func(fn func(w, i int) error) (testenv.LoadResult, testenv.LoadResult) {
		var xs, puts []testenv.LoadResult
		for r := range rounds {
			testenv.ABBA(r,
				func() { puts = append(puts, putLoad(round)) },
				func() { xs = append(xs, testenv.Load(64, round, fn)) })
		}
		allPuts = append(allPuts, puts...)
		return testenv.Merge(xs...), testenv.Merge(puts...)
	}
	cas := testenv.Load(32, d, func(w, i int) error {
		for {
			g, err := cli.Get(ctx, "/bench/cas")
			if err != nil {
				return err
			}
			var rev, n int64
			if len(g.Kvs) > 0 {
				rev = g.Kvs[0].ModRevision
				n, _ = strconv.ParseInt(string(g.Kvs[0].Value), 10, 64)
			}
			r, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision("/bench/cas"), "=", rev)).
				Then(clientv3.OpPut("/bench/cas", strconv.FormatInt(n+1, 10))).Commit()
			if err != nil {
				return err
			}
			if r.Succeeded {
				return nil
			}
		}
	})

	hotBucket := []*adminv1.BucketSpec{spec("hot", 1, 1<<60)}
	var spreadBuckets []*adminv1.BucketSpec
	for i := 0; i < 16; i++ {
		spreadBuckets = append(spreadBuckets, spec(fmt.Sprintf("s%02d", i), 1, 1<<60))
	}
	run := func(prefix string, buckets []*adminv1.BucketSpec, strategy allocatorv1.Strategy, commit bool) (testenv.LoadResult, testenv.LoadResult) {
		var replicas []replica
		for r := 0; r < 4; r++ {
			replicas = append(replicas, startReplica(b, testenv.EtcdClient(b, srv.Endpoint), allocator.Config{
				Buckets: buckets, Prefix: prefix, Strategy: strategy, ReservationTTL: time.Minute,
			}))
		}
		// Each run's replicas stop when it ends: a later run must not
		// pay for an earlier one's janitors and watches.
		defer func() {
			for _, rp := range replicas {
				rp.stop()
			}
		}()
		return paired(func(w, i int) error {
			rp := replicas[w%4]
			a, err := rp.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1024})
			if err != nil || !commit {
				return err
			}
			_, err = rp.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId(), ReservedBytes: 1024, Size: 1024})
			return err
		})
	}
	// The same work without the allocator's gRPC hop: 4 replicas' ledgers,
	// each with its own etcd client, called in process.
	direct := func(prefix string, commit bool) (testenv.LoadResult, testenv.LoadResult) {
		var caps []*ledger.Capacity
		rctx, cancel := context.WithCancel(ctx)
		var running sync.WaitGroup
		defer func() { cancel(); running.Wait() }()
		for r := 0; r < 4; r++ {
			l := ledger.New(testenv.EtcdClient(b, srv.Endpoint), ledger.Options{Prefix: prefix})
			c := l.NewCapacity(fmt.Sprintf("r%d", r), 10*time.Second, slog.New(slog.DiscardHandler))
			running.Go(func() { _ = c.Run(rctx) })
			caps = append(caps, c)
		}
		return paired(func(w, i int) error {
			c := caps[w%4]
			res, err := c.Reserve(ctx, hotBucket[0], 1024, time.Minute)
			if err != nil || !commit {
				return err
			}
			_, err = c.Commit(ctx, hotBucket[0], res.ID, 1024, nil)
			return err
		})
	}
	ledgerHot, ledgerHotPut := direct("/bench/ledger-hot/", false)
	ledgerCycle, ledgerCyclePut := direct("/bench/ledger-cycle/", true)
	hot, hotPut := run("/bench/hot/", hotBucket, allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, false)
	spread, spreadPut := run("/bench/spread/", spreadBuckets, allocatorv1.Strategy_STRATEGY_RANDOM, false)
	cycle, cyclePut := run("/bench/cycle/", hotBucket, allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, true)
	put := testenv.Merge(allPuts...)

	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\nallocator on embedded etcd (fsync on)\tops/s\tp50\tp99\tvs Put\tCPU/op\terrors\t")
	row := func(name string, r, base testenv.LoadResult) {
		fmt.Fprintf(tw, "%s\t%.0f\t%s\t%s\t%.2fx\t%s\t%d\t\n", name, r.Rate, r.Quantile(.5).Round(10*time.Microsecond),
			r.Quantile(.99).Round(10*time.Microsecond), r.Rate/base.Rate, r.CPUPerOp.Round(time.Microsecond), r.Errors)
	}
	row("baseline: plain Put, 64 writers (all rounds)", put, put)
	row("baseline: 1-key CAS, 32 writers", cas, put)
	row("ledger reserve, hot bucket, 4x16", ledgerHot, ledgerHotPut)
	row("ledger reserve+commit, hot bucket", ledgerCycle, ledgerCyclePut)
	row("gRPC allocate, hot bucket, 4x16", hot, hotPut)
	row("gRPC allocate, 16 buckets, 4x16", spread, spreadPut)
	row("gRPC allocate+commit, hot bucket", cycle, cyclePut)
	tw.Flush()
	fmt.Println("(each row's ratio is against the Put rounds alternating with it)")
	b.ReportMetric(ledgerHot.Rate/ledgerHotPut.Rate, "ledger-hot/put")
	b.ReportMetric(ledgerCycle.Rate/ledgerCyclePut.Rate, "ledger-cycle/put")
	b.ReportMetric(hot.Rate/hotPut.Rate, "hot-alloc/put")
	b.ReportMetric(cycle.Rate/cyclePut.Rate, "hot-cycle/put")
	b.ReportMetric(spread.Rate/spreadPut.Rate, "spread-alloc/put")
}
