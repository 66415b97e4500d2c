// Package ledgertest checks the ledger's invariants against etcd's
// recorded history; tests of the ledger and of the allocator share it.
package ledgertest

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bucketlb/bucketlb/pkg/ledger"
)

// Replay reads the history of prefix from revision 1 up to the current
// revision and checks, after every revision, that each bucket's committed
// usage in period (base + shards) plus the capacity blocks held by
// replicas stays within its limit, and that each replica's live
// reservations fit in its block. It returns the final usage per bucket
// and the number of revisions checked.
// Run it before etcd compacts (tests do not enable compaction that fast).
func Replay(ctx context.Context, cli *clientv3.Client, prefix, period string, limits map[string]int64) (map[string]int64, int, error) {
	head, err := cli.Get(ctx, prefix+"\x00")
	if err != nil {
		return nil, 0, err
	}
	usagePrefix := prefix + "usage/" + period + "/"
	shardPrefix := prefix + "ushard/" + period + "/"
	blockPrefix := prefix + "cap/blocks/"
	resPrefix := prefix + "cap/res/"
	base := map[string]int64{}
	shards := map[string]int64{} // key -> bytes
	blocks := map[string]int64{} // key -> bytes
	type resv struct {
		size            int64
		bucket, replica string
	}
	res := map[string]resv{}
	bucketOf := func(rest string) string { b, _, _ := strings.Cut(rest, "/"); return b }
	usedOf := func() map[string]int64 {
		used := map[string]int64{}
		for b, n := range base {
			used[b] += n
		}
		for k, n := range shards {
			used[bucketOf(strings.TrimPrefix(k, shardPrefix))] += n
		}
		return used
	}
	check := func(rev int64) error {
		used := usedOf()
		held := map[string]int64{}
		for k, n := range blocks {
			held[bucketOf(strings.TrimPrefix(k, blockPrefix))] += n
		}
		carved := map[string]int64{} // bucket/replica -> bytes
		for _, r := range res {
			carved[r.bucket+"/"+r.replica] += r.size
		}
		for id, lim := range limits {
			if used[id]+held[id] > lim {
				return fmt.Errorf("revision %d: bucket %s used %d + held in blocks %d > limit %d", rev, id, used[id], held[id], lim)
			}
		}
		for br, n := range carved {
			if n > blocks[blockPrefix+br] {
				return fmt.Errorf("revision %d: reservations of %s total %d > its block %d", rev, br, n, blocks[blockPrefix+br])
			}
		}
		return nil
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wch := cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(1))
	var lastRev int64
	revisions := 0
	for lastRev < head.Header.Revision {
		wr, ok := <-wch
		if !ok || wr.Err() != nil {
			return nil, revisions, fmt.Errorf("history watch ended: %v", wr.Err())
		}
		for _, ev := range wr.Events {
			rev := ev.Kv.ModRevision
			if rev != lastRev && lastRev != 0 {
				if err := check(lastRev); err != nil {
					return nil, revisions, err
				}
				revisions++
			}
			lastRev = rev
			key := string(ev.Kv.Key)
			n, _ := strconv.ParseInt(string(ev.Kv.Value), 10, 64)
			del := ev.Type == clientv3.EventTypeDelete
			switch {
			case strings.HasPrefix(key, usagePrefix):
				base[strings.TrimPrefix(key, usagePrefix)] = n
				if del {
					delete(base, strings.TrimPrefix(key, usagePrefix))
				}
			case strings.HasPrefix(key, shardPrefix):
				shards[key] = n
				if del {
					delete(shards, key)
				}
			case strings.HasPrefix(key, blockPrefix):
				blocks[key] = n
				if del {
					delete(blocks, key)
				}
			case strings.HasPrefix(key, resPrefix):
				if del {
					delete(res, key)
					continue
				}
				size, bucket, replica, err := ledger.ParseReservation(ev.Kv.Value)
				if err != nil {
					return nil, revisions, err
				}
				res[key] = resv{size, bucket, replica}
			}
		}
		if len(wr.Events) == 0 {
			lastRev = max(lastRev, wr.Header.Revision)
		}
	}
	if err := check(lastRev); err != nil {
		return nil, revisions, err
	}
	return usedOf(), revisions + 1, nil
}
