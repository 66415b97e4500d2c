package testenv

import (
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// LoadResult is what a closed-loop load run measured.
type LoadResult struct {
	// Rate is successful calls per second.
	Rate float64
	// Latencies of successful calls, sorted.
	Latencies []time.Duration
	// Errors counts failed calls; FirstErr is the first of them.
	Errors   int
	FirstErr error
	// CPUPerOp is the whole process's CPU time (user + system) during the
	// run divided by successful calls. In-process stacks share one
	// process, so this is the cost of a call across every component: on a
	// machine with few cores it says more than the rate does.
	CPUPerOp time.Duration
}

// processCPU returns the CPU time this process has used so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Quantile returns the latency at q (0–1), or 0 without samples.
func (r LoadResult) Quantile(q float64) time.Duration {
	if len(r.Latencies) == 0 {
		return 0
	}
	return r.Latencies[min(len(r.Latencies)-1, int(float64(len(r.Latencies))*q))]
}

// Load runs fn from workers goroutines, each calling it back to back with
// its worker index and call number, for about d. Benchmarks use it to
// measure a rate and its latencies against a baseline in the same run.
func Load(workers int, d time.Duration, fn func(worker, call int) error) LoadResult {
	var (
		mu       sync.Mutex
		lat      []time.Duration
		errs     atomic.Int64
		firstErr error
		wg       sync.WaitGroup
	)
	deadline := time.Now().Add(d)
	start, cpu0 := time.Now(), processCPU()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var mine []time.Duration
			for i := 0; time.Now().Before(deadline); i++ {
				t0 := time.Now()
				if err := fn(w, i); err != nil {
					if errs.Add(1) == 1 {
						mu.Lock()
						firstErr = err
						mu.Unlock()
					}
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
	cpu := processCPU() - cpu0
	slices.Sort(lat)
	r := LoadResult{Rate: float64(len(lat)) / time.Since(start).Seconds(), Latencies: lat, Errors: int(errs.Load()), FirstErr: firstErr}
	if len(lat) > 0 {
		r.CPUPerOp = cpu / time.Duration(len(lat))
	}
	return r
}

// Merge combines runs of the same load into one result, as if they had run
// back to back. Benchmarks alternate short rounds of a baseline and the
// system under test and merge each side's rounds, so drift during the run
// (a gateway slowing as its directory fills, other work on the machine)
// falls on both sides alike.
func Merge(runs ...LoadResult) LoadResult {
	var out LoadResult
	var seconds float64
	var cpu time.Duration
	for _, r := range runs {
		n := len(r.Latencies)
		if r.Rate > 0 {
			seconds += float64(n) / r.Rate
		}
		cpu += r.CPUPerOp * time.Duration(n)
		out.Latencies = append(out.Latencies, r.Latencies...)
		out.Errors += r.Errors
		if out.FirstErr == nil {
			out.FirstErr = r.FirstErr
		}
	}
	slices.Sort(out.Latencies)
	if n := len(out.Latencies); n > 0 {
		out.Rate = float64(n) / seconds
		out.CPUPerOp = cpu / time.Duration(n)
	}
	return out
}

// ABBA runs round r of a comparison: baseline then measured in rounds 0
// and 3 of every four, measured then baseline in rounds 1 and 2. Drift
// that grows over the run (etcd's history, a gateway's filling disk)
// would otherwise always fall on whichever side goes second.
func ABBA(r int, baseline, measured func()) {
	if r%4 == 0 || r%4 == 3 {
		baseline()
		measured()
		return
	}
	measured()
	baseline()
}
