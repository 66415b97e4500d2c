package health_test

import (
	"io"
	"net"
	"strings"
	"sync"
	"testing"
)

// cutter is a TCP proxy in front of etcd that can cut the client off
// (an outage as the client sees it) without stopping the server.
type cutter struct {
	lis    net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newCutter(t *testing.T, endpoint string) *cutter {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{lis: lis, target: strings.TrimPrefix(endpoint, "http://")}
	c.wg.Add(1)
	go c.accept()
	t.Cleanup(c.cut)
	return c
}

func (c *cutter) endpoint() string { return "http://" + c.lis.Addr().String() }

func (c *cutter) accept() {
	defer c.wg.Done()
	for {
		in, err := c.lis.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", c.target)
		if err != nil {
			in.Close()
			continue
		}
		c.mu.Lock()
		c.conns = append(c.conns, in, out)
		c.mu.Unlock()
		c.wg.Add(2)
		go func() { defer c.wg.Done(); _, _ = io.Copy(out, in); out.Close() }()
		go func() { defer c.wg.Done(); _, _ = io.Copy(in, out); in.Close() }()
	}
}

// cut closes the listener and every connection, and waits for the copiers.
func (c *cutter) cut() {
	c.lis.Close()
	c.mu.Lock()
	for _, conn := range c.conns {
		conn.Close()
	}
	c.conns = nil
	c.mu.Unlock()
	c.wg.Wait()
}
