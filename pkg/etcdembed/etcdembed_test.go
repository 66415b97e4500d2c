package etcdembed_test

import (
	"context"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/testenv"
)

func TestPutGet(t *testing.T) {
	_, cli := testenv.Etcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v" {
		t.Fatalf("got %v, want k=v", resp.Kvs)
	}
}
