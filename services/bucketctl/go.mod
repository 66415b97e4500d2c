module github.com/bucketlb/bucketlb/services/bucketctl

go 1.26.8

require github.com/bucketlb/bucketlb/pkg v0.0.0

replace github.com/bucketlb/bucketlb/pkg => ../../pkg
