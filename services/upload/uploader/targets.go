package uploader

import (
	"sync"
	"time"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
)

// targetTTL is how long a read or delete trusts where the allocator said
// a bucket lives, and that it serves reads: a bucket an operator disables
// stops serving on this replica within it.
const targetTTL = 2 * time.Second

// targetCache remembers LookupBucket answers for targetTTL, so reads and
// deletes do not each ask the allocator: a small read paid that round trip
// on top of its one S3 GET. Refusals (unknown, disabled) are not kept.
type targetCache struct {
	now func() time.Time
	mu  sync.Mutex
	m   map[string]cachedTarget
}

type cachedTarget struct {
	t  *allocatorv1.BucketTarget
	at time.Time
}

func newTargetCache(now func() time.Time) *targetCache {
	return &targetCache{now: now, m: map[string]cachedTarget{}}
}

// get returns the target of bucket id if it was learned within targetTTL.
func (c *targetCache) get(id string) *allocatorv1.BucketTarget {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[id]
	if !ok || c.now().Sub(e.at) >= targetTTL {
		return nil
	}
	return e.t
}

func (c *targetCache) put(id string, t *allocatorv1.BucketTarget) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[id] = cachedTarget{t: t, at: c.now()}
}
