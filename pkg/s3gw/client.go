package s3gw

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
)

// HTTPClient returns an HTTP client that trusts the gateway's certificate
// when TLS is on. Its idle connections are closed when the gateway stops.
func (g *Gateway) HTTPClient() (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if g.CAFile != "" {
		pemBytes, err := os.ReadFile(g.CAFile)
		if err != nil {
			return nil, fmt.Errorf("s3gw: read CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemBytes) {
			return nil, fmt.Errorf("s3gw: no certificate in %s", g.CAFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	g.mu.Lock()
	g.transports = append(g.transports, tr)
	g.mu.Unlock()
	return &http.Client{Transport: tr}, nil
}

// Client returns a plain aws-sdk-go-v2 S3 client for the gateway's root
// user, with the SDK's default checksum behaviour. Tests use it to look
// inside buckets independently of the code under test.
func (g *Gateway) Client() (*s3.Client, error) {
	hc, err := g.HTTPClient()
	if err != nil {
		return nil, err
	}
	return s3.New(s3.Options{
		Region:       g.Region,
		BaseEndpoint: aws.String(g.Endpoint),
		Credentials:  credentials.NewStaticCredentialsProvider(g.AccessKey, g.SecretKey, ""),
		UsePathStyle: true,
		HTTPClient:   hc,
	}), nil
}

// CreateBucket creates a bucket owned by the root user. An existing bucket
// owned by the root user is not an error.
func (g *Gateway) CreateBucket(ctx context.Context, name string) error {
	c, err := g.Client()
	if err != nil {
		return err
	}
	_, err = c.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(name)})
	if err != nil {
		var apiErr smithy.APIError
		if errors.As(err, &apiErr) && apiErr.ErrorCode() == "BucketAlreadyOwnedByYou" {
			return nil
		}
		return fmt.Errorf("s3gw: create bucket %s: %w", name, err)
	}
	return nil
}
