package pgstore_test

import (
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// delayProxy is a TCP proxy between pgx and PostgreSQL that delivers every
// byte, in each direction, a set delay after it was read: the latency of a
// distant or congested database, without throttling throughput. The delay
// can change at any time; bytes already read keep theirs.
type delayProxy struct {
	ln     net.Listener
	target string
	delay  atomic.Int64 // nanoseconds, per direction

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// newDelayProxy listens on a loopback port and forwards to the database of
// dsn(). It is closed, with every connection through it, when the test ends.
func newDelayProxy(t testing.TB) *delayProxy {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dsn())
	if err != nil {
		t.Fatal(err)
	}
	target := net.JoinHostPort(cfg.ConnConfig.Host, strconv.Itoa(int(cfg.ConnConfig.Port)))
	if cfg.ConnConfig.Host != "" && cfg.ConnConfig.Host[0] == '/' {
		target = cfg.ConnConfig.Host + "/.s.PGSQL." + strconv.Itoa(int(cfg.ConnConfig.Port))
	}
	return newDelayProxyTo(t, target)
}

// newDelayProxyTo listens on a loopback port and forwards to target, a TCP
// address or a Unix socket's path. It is closed, with every connection
// through it, when the test ends.
func newDelayProxyTo(t testing.TB, target string) *delayProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &delayProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// via points a pool's configuration at the proxy.
func (p *delayProxy) via(c *pgxpool.Config) {
	addr := p.ln.Addr().(*net.TCPAddr)
	c.ConnConfig.Host, c.ConnConfig.Port = "127.0.0.1", uint16(addr.Port)
	for _, fb := range c.ConnConfig.Fallbacks {
		fb.Host, fb.Port = "127.0.0.1", uint16(addr.Port)
	}
}

func (p *delayProxy) setDelay(d time.Duration) { p.delay.Store(int64(d)) }

func (p *delayProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		network := "tcp"
		if p.target[0] == '/' {
			network = "unix"
		}
		s, err := net.Dial(network, p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			s.Close()
			return
		}
		p.conns[c], p.conns[s] = struct{}{}, struct{}{}
		p.wg.Add(4)
		p.mu.Unlock()
		go p.pipe(s, c)
		go p.pipe(c, s)
	}
}

type chunk struct {
	b   []byte
	due time.Time
}

// pipe copies src to dst, each chunk a delay after it was read, in order.
// When either side ends, both connections are closed: a proxy that dies
// with its peer, as a TCP path does.
func (p *delayProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	ch := make(chan chunk, 4096)
	go func() {
		defer p.wg.Done()
		for c := range ch {
			time.Sleep(time.Until(c.due))
			if _, err := dst.Write(c.b); err != nil {
				break
			}
		}
		// Delivered, or dst is gone: end both directions, and let the
		// reader below see it.
		dst.Close()
		src.Close()
		for range ch {
		}
	}()
	defer close(ch)
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			ch <- chunk{b: append([]byte(nil), buf[:n]...), due: time.Now().Add(time.Duration(p.delay.Load()))}
		}
		if err != nil {
			return
		}
	}
}

func (p *delayProxy) close() {
	p.mu.Lock()
	p.closed = true
	p.ln.Close()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
