// Package streammux carries many byte streams over one host↔guest link
// (a virtio-serial port, when the VM has no vsock), so that each client
// connection to serve-vm still gets its own stream to the guest's server.
// The host opens streams; the guest accepts them.
package streammux

import (
	"io"
	"net"
	"time"

	"github.com/hashicorp/yamux"
)

func config() *yamux.Config {
	c := yamux.DefaultConfig()
	c.LogOutput = io.Discard
	// Large windows: the link is a local memory copy, not a network.
	c.MaxStreamWindowSize = 16 << 20
	c.KeepAliveInterval = 10 * time.Second
	c.ConnectionWriteTimeout = 30 * time.Second
	c.StreamOpenTimeout = 30 * time.Second
	return c
}

// Listen runs on the guest: it returns a net.Listener whose connections are
// the streams the host opens over link.
func Listen(link io.ReadWriteCloser) (net.Listener, error) {
	return yamux.Server(link, config())
}

// Session is the host side of a link.
type Session struct{ s *yamux.Session }

// Dial runs on the host: it starts the multiplexer over link.
func Dial(link io.ReadWriteCloser) (*Session, error) {
	s, err := yamux.Client(link, config())
	if err != nil {
		return nil, err
	}
	return &Session{s}, nil
}

// Open starts a new stream to the guest.
func (s *Session) Open() (net.Conn, error) { return s.s.Open() }

// Ping measures a round trip, proving the guest side is alive.
func (s *Session) Ping() (time.Duration, error) { return s.s.Ping() }

// Closed is closed when the link goes down.
func (s *Session) Closed() <-chan struct{} { return s.s.CloseChan() }

// Close ends every stream and the link.
func (s *Session) Close() error { return s.s.Close() }
