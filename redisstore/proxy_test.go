package redisstore_test

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A tcpProxy stands between a Redis client and the test Redis, as the
// network does: it can cut every connection and refuse new ones for a
// while, and delay every reply.
type tcpProxy struct {
	target string
	delay  time.Duration // added to every reply from Redis
	ln     net.Listener
	wg     sync.WaitGroup

	mu          sync.Mutex
	conns       map[net.Conn]struct{}
	refuseUntil time.Time
	closed      bool
}

// startProxy listens on 127.0.0.1:0 and forwards to target, delaying what
// target sends back by delay. It is closed at cleanup.
func startProxy(t testing.TB, target string, delay time.Duration) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &tcpProxy{target: target, delay: delay, ln: ln, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

func (p *tcpProxy) addr() string { return p.ln.Addr().String() }

// cut closes every connection, and resets new ones for refuse.
func (p *tcpProxy) cut(refuse time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refuseUntil = time.Now().Add(refuse)
	for c := range p.conns {
		reset(c)
	}
	clear(p.conns)
}

func (p *tcpProxy) close() {
	p.mu.Lock()
	p.closed = true
	_ = p.ln.Close()
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
	p.mu.Unlock()
	p.wg.Wait()
}

// reset closes c with a TCP reset, as a refused or broken connection ends.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// track registers c, unless the proxy is closed or refusing.
func (p *tcpProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || time.Now().Before(p.refuseUntil) {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

// tracked reports whether c is still registered: a cut drops them all.
func (p *tcpProxy) tracked(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.conns[c]
	return ok
}

func (p *tcpProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			reset(c)
			continue
		}
		p.wg.Add(1)
		go p.forward(c)
	}
}

func (p *tcpProxy) forward(client net.Conn) {
	defer p.wg.Done()
	server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		reset(client)
		return
	}
	if !p.tracked(client) || !p.track(server) {
		// Cut or closed while dialing.
		reset(client)
		_ = server.Close()
		return
	}
	done := func() {
		_ = client.Close()
		_ = server.Close()
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		_, _ = io.Copy(server, client)
		done()
	})
	wg.Go(func() {
		p.replies(client, server)
		done()
	})
	wg.Wait()
	p.mu.Lock()
	delete(p.conns, client)
	delete(p.conns, server)
	p.mu.Unlock()
}

// replies copies what Redis sends to the client, each chunk delay after
// it came, in order.
func (p *tcpProxy) replies(client, server net.Conn) {
	if p.delay == 0 {
		_, _ = io.Copy(client, server)
		return
	}
	type chunk struct {
		b   []byte
		due time.Time
	}
	chunks := make(chan chunk, 1024)
	go func() {
		defer close(chunks)
		for {
			b := make([]byte, 32<<10)
			n, err := server.Read(b)
			if n > 0 {
				chunks <- chunk{b[:n], time.Now().Add(p.delay)}
			}
			if err != nil {
				return
			}
		}
	}()
	for c := range chunks {
		time.Sleep(time.Until(c.due))
		if _, err := client.Write(c.b); err != nil {
			_ = server.Close()
			for range chunks {
			}
			return
		}
	}
}
