// Package backoff spaces out the tries of a call that failed: an
// exponential delay with jitter, so that the callers one fault hit at
// once do not come back at once.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Delay is the wait before try attempt+1 (attempt counts from 0):
// base·2^attempt, doubling at most six times, drawn from [d/2, 3d/2).
func Delay(base time.Duration, attempt int) time.Duration {
	d := base << min(attempt, 6)
	if d <= 0 {
		return 0
	}
	return d/2 + rand.N(d)
}

// Wait sleeps for Delay(base, attempt), or returns ctx's error if ctx
// ends first.
func Wait(ctx context.Context, base time.Duration, attempt int) error {
	t := time.NewTimer(Delay(base, attempt))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
