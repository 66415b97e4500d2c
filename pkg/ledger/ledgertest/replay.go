// Package ledgertest checks the ledger's invariants against etcd's
// recorded history; tests of the ledger and of the allocator share it.
package ledgertest

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Replay reads the history of prefix from revision 1 up to the current
// revision and checks, after every revision, that each bucket's committed
// usage in period plus its live reservations stays within its limit. It
// returns the final usage per bucket and the number of revisions checked.
// Run it before etcd compacts (tests do not enable compaction that fast).
func Replay(ctx context.Context, cli *clientv3.Client, prefix, period string, limits map[string]int64) (map[string]int64, int, error) {
	head, err := cli.Get(ctx, prefix+"\x00")
	if err != nil {
		return nil, 0, err
	}
	usagePrefix := prefix + "usage/" + period + "/"
	resPrefix := prefix + "res/"
	used := map[string]int64{}
	res := map[string]int64{}
	resBucket := map[string]string{}
	check := func(rev int64) error {
		reserved := map[string]int64{}
		for k, s := range res {
			reserved[resBucket[k]] += s
		}
		for id, lim := range limits {
			if used[id]+reserved[id] > lim {
				return fmt.Errorf("revision %d: bucket %s used %d + reserved %d > limit %d", rev, id, used[id], reserved[id], lim)
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
			switch {
			case strings.HasPrefix(key, usagePrefix):
				n, _ := strconv.ParseInt(string(ev.Kv.Value), 10, 64)
				used[strings.TrimPrefix(key, usagePrefix)] = n
			case strings.HasPrefix(key, resPrefix):
				if ev.Type == clientv3.EventTypeDelete {
					delete(res, key)
					continue
				}
				var v struct{ Size int64 }
				if err := json.Unmarshal(ev.Kv.Value, &v); err != nil {
					return nil, revisions, err
				}
				b, _, _ := strings.Cut(strings.TrimPrefix(key, resPrefix), "/")
				res[key], resBucket[key] = v.Size, b
			}
		}
		if len(wr.Events) == 0 {
			lastRev = max(lastRev, wr.Header.Revision)
		}
	}
	if err := check(lastRev); err != nil {
		return nil, revisions, err
	}
	return used, revisions + 1, nil
}
