package vmhost

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
)

// backend is a real TCP server standing in for the guest.
func backend(t testing.TB, handle func(c *net.TCPConn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	return l.Addr().String()
}

// startProxy serves a Proxy to addr on a loopback listener.
func startProxy(t testing.TB, addr string) (*Proxy, string) {
	t.Helper()
	p := &Proxy{Dial: func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(l) }()
	t.Cleanup(func() {
		p.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return p, l.Addr().String()
}

func dialTCP(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// echo copies input back and half-closes at EOF.
func echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

func TestProxyHalfCloseBothWays(t *testing.T) {
	// The backend reads the whole request, and only after the client's
	// EOF (passed on as a half-close) answers, then half-closes itself.
	addr := backend(t, func(c *net.TCPConn) {
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return
		}
		fmt.Fprintf(c, "got %d bytes", n)
		c.CloseWrite()
		// The client's side must stay readable until we are done: wait for
		// its full close.
		io.Copy(io.Discard, c)
	})
	_, paddr := startProxy(t, addr)
	c := dialTCP(t, paddr)
	defer c.Close()
	if _, err := c.Write(bytes.Repeat([]byte("x"), 100000)); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	if string(resp) != "got 100000 bytes" {
		t.Fatalf("response %q", resp)
	}
}

func TestProxyServerHalfCloseFirst(t *testing.T) {
	// The backend talks first and half-closes; the client still sends
	// afterwards and the backend still receives it.
	got := make(chan string, 1)
	addr := backend(t, func(c *net.TCPConn) {
		io.WriteString(c, "hello")
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		got <- string(b)
	})
	_, paddr := startProxy(t, addr)
	c := dialTCP(t, paddr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	greeting, err := io.ReadAll(c) // ends at the backend's half-close
	if err != nil || string(greeting) != "hello" {
		t.Fatalf("greeting %q, %v", greeting, err)
	}
	io.WriteString(c, "late reply")
	c.CloseWrite()
	select {
	case s := <-got:
		if s != "late reply" {
			t.Fatalf("backend got %q", s)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("backend never saw the client's EOF")
	}
}

func TestProxyManyConcurrentStreams(t *testing.T) {
	addr := backend(t, echo)
	p, paddr := startProxy(t, addr)
	const streams, size = 64, 1 << 20
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", paddr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			data := make([]byte, size)
			rand.Read(data)
			go func() {
				c.Write(data)
				c.(*net.TCPConn).CloseWrite()
			}()
			back, err := io.ReadAll(c)
			if err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
				return
			}
			if sha256.Sum256(back) != sha256.Sum256(data) {
				errs <- fmt.Errorf("stream %d: echoed %d bytes differ from the %d sent", i, len(back), len(data))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	st := p.Stats()
	if st.Accepted != streams || st.Failed != 0 {
		t.Errorf("stats %+v", st)
	}
	deadline := time.Now().Add(5 * time.Second)
	for p.Stats().Active != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if a := p.Stats().Active; a != 0 {
		t.Errorf("%d connections still active after every client finished", a)
	}
}

func TestProxyLargeTransfer(t *testing.T) {
	testutil.SkipIfShort(t, "moves 512 MiB")
	const size = 256 << 20
	sum := make(chan [32]byte, 1)
	addr := backend(t, func(c *net.TCPConn) {
		h := sha256.New()
		io.Copy(h, c)
		var s [32]byte
		copy(s[:], h.Sum(nil))
		sum <- s
		// Then send the same amount back.
		io.CopyN(c, zeroReader{}, size)
		c.CloseWrite()
	})
	_, paddr := startProxy(t, addr)
	c := dialTCP(t, paddr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(c, h), rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if got := <-sum; !bytes.Equal(got[:], h.Sum(nil)) {
		t.Fatal("the backend received different bytes")
	}
	n, err := io.Copy(io.Discard, c)
	if err != nil || n != size {
		t.Fatalf("read back %d bytes, %v", n, err)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func TestProxyDialFailureClosesClient(t *testing.T) {
	p := &Proxy{Dial: func(ctx context.Context) (net.Conn, error) { return nil, errors.New("guest gone") }}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go p.Serve(l)
	defer p.Close()
	c := dialTCP(t, l.Addr().String())
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("read %d bytes from a connection whose guest dial failed", n)
	}
	if p.Stats().Failed != 1 {
		t.Fatalf("stats %+v", p.Stats())
	}
}

func TestProxyShutdownDrainsThenCuts(t *testing.T) {
	release := make(chan struct{})
	addr := backend(t, func(c *net.TCPConn) {
		<-release
		io.WriteString(c, "bye")
	})
	p, paddr := startProxy(t, addr)
	c := dialTCP(t, paddr)
	defer c.Close()
	// Let the proxy pick it up.
	deadline := time.Now().Add(5 * time.Second)
	for p.Stats().Active == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	// A drain that the connection outlives: Shutdown cuts it.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := p.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want deadline exceeded", err)
	}
	close(release)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, _ := io.ReadAll(c); len(b) != 0 {
		t.Fatalf("read %q from a cut connection", b)
	}
	// No new connections.
	if c2, err := net.DialTimeout("tcp", paddr, time.Second); err == nil {
		c2.SetReadDeadline(time.Now().Add(time.Second))
		if _, err := c2.Read(make([]byte, 1)); err == nil {
			t.Fatal("proxy still serving after Shutdown")
		}
		c2.Close()
	}
}

func TestProxyShutdownWaitsForClients(t *testing.T) {
	addr := backend(t, echo)
	p, paddr := startProxy(t, addr)
	c := dialTCP(t, paddr)
	io.WriteString(c, "ping")
	buf := make([]byte, 4)
	io.ReadFull(c, buf)
	done := make(chan error, 1)
	go func() { done <- p.Shutdown(context.Background()) }()
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a client connected", err)
	case <-time.After(100 * time.Millisecond):
	}
	c.CloseWrite()
	io.ReadAll(c)
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return after the last client left")
	}
}

// BenchmarkProxyThroughput measures one client's upload through the proxy
// to a loopback sink (compare BenchmarkLoopbackDirect).
func BenchmarkProxyThroughput(b *testing.B) {
	addr := backend(b, func(c *net.TCPConn) { io.Copy(io.Discard, c); c.CloseWrite() })
	_, paddr := startProxy(b, addr)
	benchUpload(b, paddr)
}

// BenchmarkLoopbackDirect is the same upload without the proxy.
func BenchmarkLoopbackDirect(b *testing.B) {
	addr := backend(b, func(c *net.TCPConn) { io.Copy(io.Discard, c); c.CloseWrite() })
	benchUpload(b, addr)
}

func benchUpload(b *testing.B, addr string) {
	const size = 64 << 20
	buf := make([]byte, 256<<10)
	b.SetBytes(size)
	b.ResetTimer()
	for range b.N {
		c := dialTCP(b, addr)
		for sent := 0; sent < size; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		c.CloseWrite()
		io.Copy(io.Discard, c)
		c.Close()
	}
}
