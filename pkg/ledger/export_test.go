package ledger

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// ApplyLate hands evs to the replica's watch handling now, as a watch
// lagging behind etcd would deliver them.
func (c *Capacity) ApplyLate(ctx context.Context, evs []*clientv3.Event) error {
	t, err := c.wait(ctx)
	if err != nil {
		return err
	}
	c.apply(ctx, t, evs)
	return nil
}

// ResKey is the etcd key of reservation id on bucket.
func (l *Ledger) ResKey(bucket, id string) string { return l.resKey(bucket, id) }

// FoldShards runs one fold of idle usage shards now.
func (c *Capacity) FoldShards(ctx context.Context) (int, error) { return c.foldShards(ctx) }

// LateApply is how long past its expiry a reservation whose put was never
// seen in etcd holds its bytes.
const LateApply = lateApply

// SweepNow runs one janitor round now.
func (c *Capacity) SweepNow(ctx context.Context) error {
	t, err := c.wait(ctx)
	if err != nil {
		return err
	}
	for _, id := range t.bucketIDs() {
		c.sweep(ctx, t, id)
	}
	return nil
}

// EndKeep ends the time a bucket's block is kept at 0 after an unanswered
// grow that created it (see keepUntil), as lateApply passing would.
func (c *Capacity) EndKeep(ctx context.Context, bucket string) error {
	t, err := c.wait(ctx)
	if err != nil {
		return err
	}
	bc := t.bucket(bucket)
	bc.mu.Lock()
	defer bc.mu.Unlock()
	bc.keepUntil = time.Time{}
	return nil
}
