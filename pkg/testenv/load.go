package testenv

import (
	"slices"
	"sync"
	"syscall"
	"time"
)

// LoadResult is what a load run measured.
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
	var s samples
	var wg sync.WaitGroup
	deadline := time.Now().Add(d)
	start, cpu0 := time.Now(), processCPU()
	for w := 0; w < workers; w++ {
		wg.Go(func() {
			for i := 0; time.Now().Before(deadline); i++ {
				t0 := time.Now()
				err := fn(w, i)
				s.add(time.Since(t0), err)
			}
		})
	}
	wg.Wait()
	return s.result(start, processCPU()-cpu0)
}

// samples gathers a run's outcomes from its workers.
type samples struct {
	mu       sync.Mutex
	lat      []time.Duration
	errs     int
	firstErr error
}

// add records one call: its latency if it succeeded, else its error.
func (s *samples) add(lat time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		if s.errs++; s.errs == 1 {
			s.firstErr = err
		}
		return
	}
	s.lat = append(s.lat, lat)
}

// result summarises the run that began at start and used cpu.
func (s *samples) result(start time.Time, cpu time.Duration) LoadResult {
	slices.Sort(s.lat)
	r := LoadResult{Rate: float64(len(s.lat)) / time.Since(start).Seconds(), Latencies: s.lat, Errors: s.errs, FirstErr: s.firstErr}
	if len(s.lat) > 0 {
		r.CPUPerOp = cpu / time.Duration(len(s.lat))
	}
	return r
}

// LoadAt offers fn at a fixed rate (an open loop) for about d, from at
// most workers goroutines at once. A call's latency runs from when it was
// due, not from when a worker took it up, so a system that falls behind
// shows it in its latencies rather than by being asked less (no
// coordinated omission). At a rate both sides of a comparison sustain,
// the latencies compare the paths themselves; a closed loop at
// saturation ties latency to throughput instead.
func LoadAt(rate float64, workers int, d time.Duration, fn func(worker, call int) error) LoadResult {
	type call struct {
		i   int
		due time.Time
	}
	n := int(rate * d.Seconds())
	calls := make(chan call, n)
	start, cpu0 := time.Now(), processCPU()
	go func() {
		defer close(calls)
		for i := 0; i < n; i++ {
			due := start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
			time.Sleep(time.Until(due)) // the schedule itself, not a wait for an event
			calls <- call{i, due}
		}
	}()
	var s samples
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Go(func() {
			for c := range calls {
				err := fn(w, c.i)
				s.add(time.Since(c.due), err)
			}
		})
	}
	wg.Wait()
	return s.result(start, processCPU()-cpu0)
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
