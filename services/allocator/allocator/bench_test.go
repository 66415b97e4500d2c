package allocator_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

// phase runs fn from workers goroutines for about d and returns the rate
// of successful calls and their latencies.
func phase(workers int, d time.Duration, fn func(w, i int) error) (float64, []time.Duration, int) {
	var mu sync.Mutex
	var lat []time.Duration
	var fails atomic.Int64
	deadline := time.Now().Add(d)
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var mine []time.Duration
			for i := 0; time.Now().Before(deadline); i++ {
				t0 := time.Now()
				if err := fn(w, i); err != nil {
					fails.Add(1)
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	slices.Sort(lat)
	return float64(len(lat)) / time.Since(start).Seconds(), lat, int(fails.Load())
}

func pct(lat []time.Duration, p float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	return lat[min(len(lat)-1, int(float64(len(lat))*p))]
}

// BenchmarkAllocator prints allocations/s on one hot bucket and over 16
// buckets, and allocate+commit cycles/s, beside two baselines measured on
// the same embedded etcd in the same run: plain Put with 64 writers and a
// single-key compare-and-swap with 32 writers.
func BenchmarkAllocator(b *testing.B) {
	srv, cli := testenv.Etcd(b)
	const d = 4 * time.Second
	ctx := context.Background()

	putRate, putLat, _ := phase(64, d, func(w, i int) error {
		_, err := cli.Put(ctx, fmt.Sprintf("/bench/put/%d/%d", w, i), "x")
		return err
	})
	casRate, casLat, _ := phase(32, d, func(w, i int) error {
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

	hot := []*adminv1.BucketSpec{spec("hot", 1, 1<<60)}
	var spread []*adminv1.BucketSpec
	for i := 0; i < 16; i++ {
		spread = append(spread, spec(fmt.Sprintf("s%02d", i), 1, 1<<60))
	}
	run := func(prefix string, buckets []*adminv1.BucketSpec, strategy allocatorv1.Strategy, commit bool) (float64, []time.Duration, int) {
		var replicas []replica
		for r := 0; r < 4; r++ {
			replicas = append(replicas, startReplica(b, testenv.EtcdClient(b, srv.Endpoint), allocator.Config{
				Buckets: buckets, Prefix: prefix, Strategy: strategy, ReservationTTL: time.Minute,
			}))
		}
		return phase(64, d, func(w, i int) error {
			rp := replicas[w%4]
			a, err := rp.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{Size: 1024})
			if err != nil || !commit {
				return err
			}
			_, err = rp.alloc.Commit(ctx, &allocatorv1.CommitRequest{ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId(), ReservedBytes: 1024, Size: 1024})
			return err
		})
	}
	hotRate, hotLat, hotFails := run("/bench/hot/", hot, allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, false)
	spreadRate, spreadLat, spreadFails := run("/bench/spread/", spread, allocatorv1.Strategy_STRATEGY_RANDOM, false)
	cycleRate, cycleLat, cycleFails := run("/bench/cycle/", hot, allocatorv1.Strategy_STRATEGY_PRIORITY_FIRST, true)

	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\nallocator on embedded etcd (fsync on)\tops/s\tp50\tp99\tvs Put\terrors\t")
	row := func(name string, rate float64, lat []time.Duration, fails int) {
		fmt.Fprintf(tw, "%s\t%.0f\t%s\t%s\t%.2fx\t%d\t\n", name, rate, pct(lat, .5).Round(10*time.Microsecond), pct(lat, .99).Round(10*time.Microsecond), rate/putRate, fails)
	}
	row("baseline: plain Put, 64 writers", putRate, putLat, 0)
	row("baseline: 1-key CAS, 32 writers", casRate, casLat, 0)
	row("allocate, hot bucket, 4x16", hotRate, hotLat, hotFails)
	row("allocate, 16 buckets, 4x16", spreadRate, spreadLat, spreadFails)
	row("allocate+commit, hot bucket", cycleRate, cycleLat, cycleFails)
	tw.Flush()
	b.ReportMetric(hotRate/putRate, "hot-alloc/put")
	b.ReportMetric(cycleRate/putRate, "hot-cycle/put")
	b.ReportMetric(spreadRate/putRate, "spread-alloc/put")
}
