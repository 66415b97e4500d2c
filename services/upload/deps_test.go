package main

import (
	"os/exec"
	"strings"
	"testing"
)

// The data plane never talks to etcd, so its binary must not link the
// etcd server (or even the client).
func TestBinaryDoesNotLinkEtcd(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(dep, "go.etcd.io/etcd/server") || strings.HasPrefix(dep, "go.etcd.io/etcd/client") {
			t.Fatalf("upload binary links %s", dep)
		}
	}
}
