// Package config loads bucketlb's configuration: one YAML file, environment
// overrides, and the seed system's bucket variables (R2_BUCKETS,
// R2_<NAME>_*), accepted as they are.
//
// Bucket specs read here are seeds: the allocator writes them to etcd once
// and from then on etcd, changed through the AdminService, is the source
// of truth. Secrets are never part of a spec: credentials_ref names them
// and every service that talks to S3 resolves it from its own environment.
package config
