package vmhost

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy forwards each accepted client connection, byte for byte, to a new
// stream to the guest: gRPC and HTTP/2 pass through untouched, so the
// guest's actiond server is what clients talk to. Each direction is copied
// until EOF, which is passed on as a half-close (CloseWrite) of the other
// side; when both directions are done, both connections are closed.
type Proxy struct {
	// Dial opens a stream to the guest (Machine.DialGuest).
	Dial func(ctx context.Context) (net.Conn, error)
	// DialTimeout bounds Dial per connection (default 30s).
	DialTimeout time.Duration
	// Logger (default slog.Default()).
	Logger *slog.Logger

	mu       sync.Mutex
	conns    map[*proxyConn]struct{}
	ls       map[net.Listener]struct{}
	closing  bool
	wg       sync.WaitGroup
	accepted atomic.Int64
	failed   atomic.Int64
	active   atomic.Int64
	cut      bool // Close ran: connections still dialling are dropped
}

type proxyConn struct {
	client, guest net.Conn
}

// ProxyStats counts connections.
type ProxyStats struct {
	Accepted, Failed, Active int64
}

// Stats returns the connection counters.
func (p *Proxy) Stats() ProxyStats {
	return ProxyStats{Accepted: p.accepted.Load(), Failed: p.failed.Load(), Active: p.active.Load()}
}

func (p *Proxy) log() *slog.Logger {
	if p.Logger != nil {
		return p.Logger
	}
	return slog.Default()
}

// Serve accepts connections on l until l is closed or Shutdown is called,
// then returns nil (any other accept error is returned).
func (p *Proxy) Serve(l net.Listener) error {
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		return nil
	}
	if p.ls == nil {
		p.ls = make(map[net.Listener]struct{})
	}
	p.ls[l] = struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.ls, l)
		p.mu.Unlock()
	}()
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			p.mu.Lock()
			closing := p.closing
			p.mu.Unlock()
			if closing || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				p.log().Warn("proxy: accept failed; retrying", "err", err, "in", delay)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		p.accepted.Add(1)
		if !p.track(c) {
			c.Close()
			return nil
		}
		go p.handle(c)
	}
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		return false
	}
	p.wg.Add(1)
	p.active.Add(1)
	return true
}

func (p *Proxy) handle(client net.Conn) {
	defer p.wg.Done()
	defer p.active.Add(-1)
	if tc, ok := client.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	timeout := p.DialTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	guest, err := p.Dial(ctx)
	cancel()
	if err != nil {
		p.failed.Add(1)
		p.log().Warn("proxy: cannot open a stream to the guest; dropping the client connection", "client", client.RemoteAddr().String(), "err", err)
		client.Close()
		return
	}
	if tc, ok := guest.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	pc := &proxyConn{client: client, guest: guest}
	p.mu.Lock()
	if p.cut {
		// Close already force-closed everything.
		p.mu.Unlock()
		client.Close()
		guest.Close()
		return
	}
	if p.conns == nil {
		p.conns = make(map[*proxyConn]struct{})
	}
	p.conns[pc] = struct{}{}
	p.mu.Unlock()

	Pipe(client, guest)

	p.mu.Lock()
	delete(p.conns, pc)
	p.mu.Unlock()
}

// Pipe copies a→b and b→a until both directions end, passing each EOF on
// as a half-close of the other side, then closes both. A copy error (as
// opposed to EOF) closes both at once, which ends the other direction too.
func Pipe(a, b net.Conn) {
	var wg sync.WaitGroup
	var once sync.Once
	abort := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	wg.Add(2)
	copyHalf := func(dst, src net.Conn) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		if err != nil {
			abort()
			return
		}
		// EOF from src: tell dst no more data comes.
		if CloseWrite(dst) != nil {
			abort()
		}
	}
	go copyHalf(b, a)
	go copyHalf(a, b)
	wg.Wait()
	abort()
}

// CloseWrite half-closes c when it supports that (TCP, Unix, vsock
// sockets, streammux streams); otherwise it closes c entirely, which is
// the only way left to pass the EOF on.
func CloseWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// StopAccepting closes the listeners Serve runs on; proxied connections
// go on.
func (p *Proxy) StopAccepting() {
	p.mu.Lock()
	p.closing = true
	for l := range p.ls {
		l.Close()
	}
	p.mu.Unlock()
}

// Shutdown stops accepting, waits until every proxied connection has ended
// or ctx ends, then closes the remaining ones. It returns ctx.Err() if it
// had to cut connections.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.StopAccepting()
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	p.Close()
	<-done
	return ctx.Err()
}

// Close stops accepting and closes every connection at once.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closing = true
	p.cut = true
	for l := range p.ls {
		l.Close()
	}
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for pc := range conns {
		pc.client.Close()
		pc.guest.Close()
	}
	return nil
}
