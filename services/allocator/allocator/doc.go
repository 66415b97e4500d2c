// Package allocator is bucketlb's control plane: it serves the
// AllocatorService (called by the upload service) and the AdminService
// (operators, bearer token), keeping all shared state in etcd through the
// ledger and health packages so that every replica is active and agrees.
package allocator
