package backoff_test

import (
	"context"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/backoff"
)

// Delays double per try up to six doublings, each within [d/2, 3d/2).
func TestDelay(t *testing.T) {
	const base = 10 * time.Millisecond
	for attempt := 0; attempt < 10; attempt++ {
		d := base << min(attempt, 6)
		for i := 0; i < 200; i++ {
			if got := backoff.Delay(base, attempt); got < d/2 || got >= d/2+d {
				t.Fatalf("attempt %d: %v, want within [%v, %v)", attempt, got, d/2, d/2+d)
			}
		}
	}
	if got := backoff.Delay(0, 3); got != 0 {
		t.Fatalf("zero base: %v", got)
	}
}

// Wait returns ctx's error as soon as ctx ends.
func TestWaitEndsWithItsContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := backoff.Wait(ctx, time.Hour, 0); err != context.Canceled {
		t.Fatalf("wait on an ended context: %v", err)
	}
}
