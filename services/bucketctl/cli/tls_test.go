package cli_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/tlsfiles"
	"github.com/bucketlb/bucketlb/services/bucketctl/cli"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
)

// bucketctl reaches an upload service that requires mutual TLS with
// --tls-ca, --tls-cert and --tls-key, and is turned away without them.
func TestUploadOverMutualTLS(t *testing.T) {
	pki := testenv.NewPKI(t)
	env := e2e.StartWith(t, devstack.Options{UploadTLS: pki.MutualTLS(t, "upload")})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	run := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		root := cli.NewRoot(&out, &errOut)
		root.SetArgs(append([]string{"--upload-addr", env.Stack.UploadAddr, "--timeout", "20s"}, args...))
		err := root.ExecuteContext(ctx)
		return out.String() + errOut.String(), err
	}
	src := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(src, e2e.RandomBytes(t, 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	cc, ck := pki.Issue(t, "thumbnailer", nil, "spiffe://test/thumbnailer")
	if out, err := run("upload", "-q", src, "--tls-ca", pki.CAFile, "--tls-cert", cc, "--tls-key", ck); err != nil || !strings.Contains(out, "sha256") {
		t.Fatalf("upload over mutual TLS: %v (%s)", err, out)
	}
	if out, err := run("upload", "-q", src, "--tls-ca", pki.CAFile); err == nil {
		t.Fatalf("upload without a client certificate succeeded: %s", out)
	}
	// A CA that did not sign the server's certificate fails at once,
	// saying so: no retry gets past it.
	other := testenv.NewPKI(t)
	if out, err := run("upload", "-q", src, "--tls-ca", other.CAFile, "--tls-cert", cc, "--tls-key", ck); err == nil ||
		strings.Contains(out, "retrying") || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
		t.Fatalf("upload trusting another CA: %v (%s), want one attempt failing on the certificate", err, out)
	}
	if out, err := run("upload", "-q", src); err == nil {
		t.Fatalf("upload in plain text to a TLS service succeeded: %s", out)
	}
	// Half a client certificate is a mistake to report, not plain text.
	if out, err := run("upload", "-q", src, "--tls-key", ck); err == nil || !strings.Contains(out+err.Error(), "both") {
		t.Fatalf("--tls-key alone: %v (%s), want an error asking for both files", err, out)
	}
}

// A TLS client talking to a plain-text service fails at once, saying so:
// no retry gets past it either.
func TestTLSClientToPlainTextServiceFailsAtOnce(t *testing.T) {
	pki := testenv.NewPKI(t)
	env := e2e.StartWith(t, devstack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(src, e2e.RandomBytes(t, 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	root := cli.NewRoot(&out, &out)
	root.SetArgs([]string{"--upload-addr", env.Stack.UploadAddr, "--timeout", "20s", "upload", "-q", src, "--tls-ca", pki.CAFile})
	err := root.ExecuteContext(ctx)
	if err == nil || strings.Contains(out.String(), "retrying") || !strings.Contains(err.Error(), "does not look like a TLS handshake") {
		t.Fatalf("TLS upload to a plain-text service: %v (%s), want one attempt failing on the handshake", err, out.String())
	}
	// --tls=false turns TLS off even with a CA named in the environment.
	t.Setenv("BUCKETLB_TLS_CA", pki.CAFile)
	out.Reset()
	root = cli.NewRoot(&out, &out)
	root.SetArgs([]string{"--upload-addr", env.Stack.UploadAddr, "--timeout", "20s", "--tls=false", "upload", "-q", src})
	if err := root.ExecuteContext(ctx); err != nil {
		t.Fatalf("--tls=false with BUCKETLB_TLS_CA set: %v (%s), want plain text", err, out.String())
	}
}

// An allocator that requires mutual TLS serves the upload service that
// presents a certificate (uploads work end to end) and bucketctl's admin
// commands given --allocator-tls-*; a plain-text admin call is turned away.
func TestAllocatorOverMutualTLS(t *testing.T) {
	pki := testenv.NewPKI(t)
	uc, uk := pki.Issue(t, "upload", nil, "spiffe://test/upload")
	client, err := tlsfiles.Client(pki.CAFile, uc, uk)
	if err != nil {
		t.Fatal(err)
	}
	// The allocator's certificate names its Service, not the address
	// dialled (as through a port-forward).
	client.ServerName = "allocator.test"
	sc, sk := pki.Issue(t, "allocator", []string{"allocator.test"})
	server, err := tlsfiles.Server(sc, sk, pki.CAFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	env := e2e.StartWith(t, devstack.Options{AllocatorTLS: server, AllocatorClientTLS: client})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := filepath.Join(t.TempDir(), "f.bin")
	if err := os.WriteFile(src, e2e.RandomBytes(t, 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, error) {
		var out bytes.Buffer
		root := cli.NewRoot(&out, &out)
		root.SetArgs(append([]string{"--upload-addr", env.Stack.UploadAddr, "--allocator-addr", env.Stack.AllocatorAddr,
			"--token-file", env.Stack.TokenFile, "--timeout", "20s"}, args...))
		err := root.ExecuteContext(ctx)
		return out.String(), err
	}
	if out, err := run("upload", "-q", src); err != nil || !strings.Contains(out, "sha256") {
		t.Fatalf("upload through an allocator over mutual TLS: %v (%s)", err, out)
	}
	ac, ak := pki.Issue(t, "operator", nil, "spiffe://test/operator")
	withCert := []string{"--allocator-tls-ca", pki.CAFile, "--allocator-tls-cert", ac, "--allocator-tls-key", ak}
	if out, err := run(append([]string{"status", "--allocator-tls-server-name", "allocator.test"}, withCert...)...); err != nil || !strings.Contains(out, "dev-") {
		t.Fatalf("status over mutual TLS: %v (%s)", err, out)
	}
	if out, err := run(append([]string{"status"}, withCert...)...); err == nil || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("status expecting the address's name in the certificate: %v (%s), want a refusal naming it", err, out)
	}
	if out, err := run("status"); err == nil {
		t.Fatalf("status in plain text to an allocator that requires TLS succeeded: %s", out)
	}
	if out, err := run("status", "--allocator-tls-ca", pki.CAFile); err == nil {
		t.Fatalf("status without a client certificate succeeded: %s", out)
	}
}
