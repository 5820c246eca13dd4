//go:build linux

package redisstore_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// A testCluster is a Redis Cluster of its own that a failover test starts,
// breaks and stops: three masters with one replica each, redis-server
// processes that are children of the test (killed with it, by Pdeathsig, if
// it dies), on loopback ports from base to base+5, in a temporary directory.
// The failover tests use the ports 17100-17199, apart from the cluster that
// .ci/redis-cluster starts on 17000-17005 for the other cluster tests.
type testCluster struct {
	t           *testing.T
	dir         string
	nodeTimeout time.Duration
	nodes       map[int]*exec.Cmd // port -> running process
	ports       []int
}

// startTestCluster starts a cluster on ports base to base+5 and waits until
// every node has it in state ok and every master its replica in sync. It
// skips (fails with CI=true) when redis-server or redis-cli is missing, and
// with -short. The processes are killed at cleanup, whatever the outcome.
func startTestCluster(t *testing.T, base int, nodeTimeout time.Duration) *testCluster {
	t.Helper()
	if testing.Short() {
		t.Skip("failover tests start a Redis Cluster of their own; skipped with -short")
	}
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			msg := bin + " is not on PATH (" + err.Error() + "); the failover tests start a Redis Cluster of their own"
			if os.Getenv("CI") == "true" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
	c := &testCluster{t: t, dir: t.TempDir(), nodeTimeout: nodeTimeout, nodes: map[int]*exec.Cmd{}}
	// go-redis logs every dial to a node that is down, as they are meant
	// to be here.
	redis.SetLogger(discardLogger{})
	t.Cleanup(func() { redis.SetLogger(stderrLogger{log.New(os.Stderr, "redis: ", log.LstdFlags|log.Lshortfile)}) })
	t.Cleanup(c.stop)
	var addrs []string
	for i := range 6 {
		port := base + i
		c.ports = append(c.ports, port)
		addrs = append(addrs, c.addr(port))
		// A node left on the port by an earlier run that died is ours.
		_ = exec.Command("redis-cli", "-h", "127.0.0.1", "-p", strconv.Itoa(port), "shutdown", "nosave").Run()
		c.start(port)
	}
	for _, p := range c.ports {
		c.waitPing(p)
	}
	out, err := exec.Command("redis-cli", append(append([]string{"--cluster", "create"}, addrs...), "--cluster-replicas", "1", "--cluster-yes")...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	c.waitHealthy(30 * time.Second)
	return c
}

type discardLogger struct{}

func (discardLogger) Printf(context.Context, string, ...any) {}

type stderrLogger struct{ l *log.Logger }

func (s stderrLogger) Printf(_ context.Context, format string, v ...any) {
	_ = s.l.Output(2, fmt.Sprintf(format, v...))
}

func (c *testCluster) addr(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }

func (c *testCluster) addrs() []string {
	var a []string
	for _, p := range c.ports {
		a = append(a, c.addr(p))
	}
	return a
}

// start runs the node of port, with its data (only nodes.conf: nothing is
// persisted) in its own directory, so that a restarted node rejoins.
func (c *testCluster) start(port int) {
	c.t.Helper()
	dir := filepath.Join(c.dir, strconv.Itoa(port))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		c.t.Fatal(err)
	}
	cmd := exec.Command("redis-server",
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", dir,
		"--logfile", filepath.Join(dir, "redis.log"),
		"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
		"--cluster-node-timeout", strconv.FormatInt(c.nodeTimeout.Milliseconds(), 10),
		"--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("starting redis-server on %d: %v", port, err)
	}
	c.nodes[port] = cmd
}

// kill kills the node of port with SIGKILL and reaps it.
func (c *testCluster) kill(port int) {
	if cmd := c.nodes[port]; cmd != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		delete(c.nodes, port)
	}
}

func (c *testCluster) signal(port int, sig syscall.Signal) {
	c.t.Helper()
	if err := c.nodes[port].Process.Signal(sig); err != nil {
		c.t.Fatalf("signal %v to the node on %d: %v", sig, port, err)
	}
}

func (c *testCluster) stop() {
	for p, cmd := range c.nodes {
		if c.t.Failed() {
			if log, err := os.ReadFile(filepath.Join(c.dir, strconv.Itoa(p), "redis.log")); err == nil {
				c.t.Logf("log of the node on %d (last 2000 bytes):\n%s", p, tail(log, 2000))
			}
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	c.nodes = nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

func (c *testCluster) do(port int, args ...any) (any, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	rc := redis.NewClient(&redis.Options{Addr: c.addr(port), MaxRetries: -1, DialerRetries: 1})
	defer rc.Close()
	return rc.Do(ctx, args...).Result()
}

func (c *testCluster) waitPing(port int) {
	c.t.Helper()
	c.waitFor(10*time.Second, fmt.Sprintf("redis-server on %d answering", port), func() bool {
		_, err := c.do(port, "ping")
		return err == nil
	})
}

func (c *testCluster) waitFor(within time.Duration, what string, cond func() bool) {
	c.t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			c.t.Fatalf("waited %v for %s", within, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A clusterNode is one line of CLUSTER NODES.
type clusterNode struct {
	id, master string
	port       int
	isMaster   bool
	failed     bool
	slots      bool // serves slots
}

// topology returns the nodes as the node of port sees them.
func (c *testCluster) topology(port int) ([]clusterNode, error) {
	v, err := c.do(port, "cluster", "nodes")
	if err != nil {
		return nil, err
	}
	var nodes []clusterNode
	for _, line := range strings.Split(strings.TrimSpace(fmt.Sprint(v)), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 {
			continue
		}
		addr, _, _ := strings.Cut(f[1], "@")
		_, ps, _ := strings.Cut(addr, ":")
		p, _ := strconv.Atoi(ps)
		nodes = append(nodes, clusterNode{
			id: f[0], port: p, master: f[3],
			isMaster: strings.Contains(f[2], "master"),
			failed:   strings.Contains(f[2], "fail"),
			slots:    len(f) > 8,
		})
	}
	return nodes, nil
}

// pair returns a master that serves slots and its replica, as the node of
// port sees them.
func (c *testCluster) pair(port int) (master, replica int) {
	c.t.Helper()
	nodes, err := c.topology(port)
	if err != nil {
		c.t.Fatal(err)
	}
	for _, m := range nodes {
		if !m.isMaster || !m.slots || m.failed {
			continue
		}
		for _, r := range nodes {
			if r.master == m.id && !r.failed {
				return m.port, r.port
			}
		}
	}
	c.t.Fatalf("no master with a replica in %+v", nodes)
	return 0, 0
}

// role returns what ROLE says the node of port is ("master" or "slave").
func (c *testCluster) role(port int) string {
	v, err := c.do(port, "role")
	if err != nil {
		return ""
	}
	if r, ok := v.([]any); ok && len(r) > 0 {
		return fmt.Sprint(r[0])
	}
	return ""
}

// waitHealthy waits until every running node reports cluster_state:ok, sees
// no node failed, and every master that serves slots has a replica whose
// link is up.
func (c *testCluster) waitHealthy(within time.Duration) {
	c.t.Helper()
	c.waitFor(within, "the cluster to be healthy", func() bool {
		for p := range c.nodes {
			v, err := c.do(p, "cluster", "info")
			if err != nil || !strings.Contains(fmt.Sprint(v), "cluster_state:ok") {
				return false
			}
			nodes, err := c.topology(p)
			if err != nil {
				return false
			}
			for _, n := range nodes {
				if n.failed {
					return false
				}
			}
			if c.role(p) == "slave" {
				v, err := c.do(p, "info", "replication")
				if err != nil || !strings.Contains(fmt.Sprint(v), "master_link_status:up") {
					return false
				}
			}
		}
		masters := 0
		for p := range c.nodes {
			if c.role(p) == "master" {
				v, err := c.do(p, "info", "replication")
				if err != nil || !bytes.Contains([]byte(fmt.Sprint(v)), []byte("connected_slaves:1")) {
					return false
				}
				masters++
			}
		}
		return masters == 3
	})
}
