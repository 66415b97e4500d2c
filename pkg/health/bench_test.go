package health_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bucketlb/bucketlb/pkg/health"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// BenchmarkReportSuccesses measures the normal case of the health path:
// every upload on the hot bucket reports a success. Two replicas × 16
// callers report successes on one bucket, first written at once (as
// failures are: concurrent reports of a replica share one compare-and-put),
// then batched, on the same etcd in the same run. It prints reports/s, etcd writes, and the ratio.
func BenchmarkReportSuccesses(b *testing.B) {
	const replicas, callers, perCaller = 2, 16, 60
	type result struct {
		rate   float64
		writes int64
	}
	measure := func(pol health.Policy, runCache bool) result {
		srv, _ := testenv.Etcd(b)
		ctx, cancel := context.WithCancel(context.Background())
		var stores []*health.Store
		var clis []*clientv3.Client
		var wg sync.WaitGroup
		for i := 0; i < replicas; i++ {
			cli := testenv.EtcdClient(b, srv.Endpoint)
			s := health.NewStore(cli, "", nil, pol)
			if runCache {
				wg.Add(1)
				go func() { defer wg.Done(); _ = s.Run(ctx) }()
			}
			stores, clis = append(stores, s), append(clis, cli)
		}
		defer func() { cancel(); wg.Wait() }()
		// Let the caches load: a record written by one is seen by all.
		if _, err := stores[0].Report(ctx, "warm", false, 0); err != nil {
			b.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for runCache && time.Now().Before(deadline) {
			if _, ok := stores[replicas-1].Cached("warm"); ok {
				break
			}
			time.Sleep(time.Millisecond)
		}
		rev := func() int64 {
			r, err := clis[0].Get(ctx, "/x")
			if err != nil {
				b.Fatal(err)
			}
			return r.Header.Revision
		}
		rev0 := rev()
		t0 := time.Now()
		var cw sync.WaitGroup
		for i := 0; i < replicas*callers; i++ {
			cw.Add(1)
			go func(s *health.Store) {
				defer cw.Done()
				for j := 0; j < perCaller; j++ {
					if _, err := s.Report(ctx, "hot", true, 20*time.Millisecond); err != nil {
						b.Error(err)
						return
					}
				}
			}(stores[i%replicas])
		}
		cw.Wait()
		el := time.Since(t0)
		return result{rate: float64(replicas*callers*perCaller) / el.Seconds(), writes: rev() - rev0}
	}
	for i := 0; i < b.N; i++ {
		through := measure(health.Policy{FlushEvery: -1}, false)
		batched := measure(health.Policy{}, true)
		b.ReportMetric(through.rate, "writethrough-reports/s")
		b.ReportMetric(batched.rate, "batched-reports/s")
		b.ReportMetric(batched.rate/through.rate, "speedup")
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "health successes, %d replicas x %d callers\treports/s\tetcd writes\t\n", replicas, callers)
		fmt.Fprintf(tw, "written at once (group commit per replica)\t%.0f\t%d\t\n", through.rate, through.writes)
		fmt.Fprintf(tw, "batched (flush every 1s)\t%.0f\t%d\t\n", batched.rate, batched.writes)
		fmt.Fprintf(tw, "ratio batched / write-through\t%.1fx\t\t\n", batched.rate/through.rate)
		tw.Flush()
	}
}
