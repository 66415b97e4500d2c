// Package etcdclient is how bucketlb's services, the dev stack and the
// tests dial etcd.
package etcdclient

import (
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// MaxReconnectDelay bounds the wait between attempts to reach etcd again.
// gRPC's default backoff grows to two minutes, and while a connection
// waits out its backoff every call fails at once: after an etcd outage an
// allocator replica went on refusing uploads (fail closed) for up to 60 %
// of the outage's length once etcd was back, 43 s after a 61 s outage.
const MaxReconnectDelay = 2 * time.Second

// Config returns the client configuration for endpoints: calls that fail
// stay fast (the ledger bounds each call), and a connection is tried again
// at least every MaxReconnectDelay.
func Config(endpoints []string) clientv3.Config {
	return clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		// The client logs every retried ambiguous write, which the
		// ledger expects and handles.
		Logger: zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 250 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: MaxReconnectDelay},
			MinConnectTimeout: 5 * time.Second,
		})},
	}
}

// New returns a client for endpoints with Config.
func New(endpoints []string) (*clientv3.Client, error) { return clientv3.New(Config(endpoints)) }
