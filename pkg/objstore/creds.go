package objstore

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
)

// Credentials resolves a bucket's credentials_ref to keys. Secrets never
// pass through etcd or logs.
type Credentials interface {
	Resolve(ref string) (aws.Credentials, error)
}

// EnvCredentials reads <REF>_ACCESS_KEY_ID and <REF>_SECRET_ACCESS_KEY, or,
// when Dir is set and holds <Dir>/<ref>/access_key_id and
// secret_access_key (a mounted Kubernetes secret), those files first.
type EnvCredentials struct {
	Dir    string
	Getenv func(string) string
}

// Resolve implements Credentials.
func (e EnvCredentials) Resolve(ref string) (aws.Credentials, error) {
	if e.Dir != "" {
		id, err1 := os.ReadFile(filepath.Join(e.Dir, ref, "access_key_id"))
		secret, err2 := os.ReadFile(filepath.Join(e.Dir, ref, "secret_access_key"))
		if err1 == nil && err2 == nil {
			return aws.Credentials{AccessKeyID: strings.TrimSpace(string(id)), SecretAccessKey: strings.TrimSpace(string(secret)), Source: "file"}, nil
		}
	}
	get := e.Getenv
	if get == nil {
		get = os.Getenv
	}
	// Trimmed like the mounted files: a Secret made from a file usually
	// ends in a newline, which S3 would refuse as a wrong signature (or an
	// invalid header), a fault counted against the bucket on every replica.
	id, secret := strings.TrimSpace(get(ref+"_ACCESS_KEY_ID")), strings.TrimSpace(get(ref+"_SECRET_ACCESS_KEY"))
	if id == "" || secret == "" {
		return aws.Credentials{}, fmt.Errorf("objstore: no credentials for %q: set %s_ACCESS_KEY_ID and %s_SECRET_ACCESS_KEY", ref, ref, ref)
	}
	return aws.Credentials{AccessKeyID: id, SecretAccessKey: secret, Source: "env"}, nil
}

// StaticCredentials maps refs to {access key, secret}; for the dev stack
// and tests.
type StaticCredentials map[string][2]string

// Resolve implements Credentials.
func (s StaticCredentials) Resolve(ref string) (aws.Credentials, error) {
	v, ok := s[ref]
	if !ok {
		return aws.Credentials{}, fmt.Errorf("objstore: no credentials for %q", ref)
	}
	return aws.Credentials{AccessKeyID: v[0], SecretAccessKey: v[1], Source: "static"}, nil
}
