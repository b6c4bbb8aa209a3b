package qemu

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/actiond/actiond/internal/streammux"
)

// serialLink carries streammux over the "actiond" virtio-serial port,
// whose host end is a QEMU chardev socket.
//
// Bytes sent before the guest opened its end would wait in QEMU and age
// (yamux gives up on unanswered stream opens and pings after ~30s), and
// bytes of an old session left in the socket would confuse a new one. So
// the link follows the guest: QMP's VSERPORT_CHANGE events say when the
// guest opens or closes the port; a session starts only on a port opened
// since the last session ended, on a fresh socket connection. The guest
// closes and reopens its port when the host disconnects (see package
// guest), which gives the next session a clean start.
type serialLink struct {
	path string
	log  *slog.Logger

	mu       sync.Mutex
	open     bool          // the guest has the port open
	opens    int           // how many times the guest opened it
	changed  chan struct{} // closed and replaced on every change
	closed   bool
	sess     *streammux.Session
	conn     net.Conn
	needOpen int // a new session needs opens >= needOpen
}

func newSerialLink(path string, log *slog.Logger) *serialLink {
	return &serialLink{path: path, log: log, changed: make(chan struct{}), needOpen: 1}
}

// portChanged records a VSERPORT_CHANGE event.
func (s *serialLink) portChanged(open bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.open = open
	if open {
		s.opens++
	}
	close(s.changed)
	s.changed = make(chan struct{})
	s.log.Debug("guest serial port", "open", open, "opens", s.opens)
}

// session returns the live session, starting one when the guest is ready
// for it; it waits for the guest until ctx or done ends.
func (s *serialLink) session(ctx context.Context, done <-chan struct{}) (*streammux.Session, error) {
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, net.ErrClosed
		}
		if s.sess != nil {
			select {
			case <-s.sess.Closed():
				// The session died: the guest must reopen its port before
				// the next one.
				s.log.Debug("serial session ended; waiting for the guest to reopen the port")
				s.conn.Close()
				s.sess, s.conn = nil, nil
				s.needOpen = s.opens + 1
			default:
				sess := s.sess
				s.mu.Unlock()
				return sess, nil
			}
		}
		if s.open && s.opens >= s.needOpen {
			sess, err := s.connectLocked(ctx)
			s.mu.Unlock()
			return sess, err
		}
		changed := s.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the guest to open its serial port: %w", ctx.Err())
		case <-done:
			return nil, fmt.Errorf("waiting for the guest to open its serial port: vm ended")
		}
	}
}

func (s *serialLink) connectLocked(ctx context.Context) (*streammux.Session, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", s.path)
	if err != nil {
		return nil, fmt.Errorf("connect to the serial port socket: %w", err)
	}
	sess, err := streammux.Dial(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("start stream multiplexer: %w", err)
	}
	s.sess, s.conn = sess, conn
	s.log.Debug("serial session started", "opens", s.opens)
	return sess, nil
}

// Dial opens a stream to the guest.
func (s *serialLink) Dial(ctx context.Context, done <-chan struct{}) (net.Conn, error) {
	sess, err := s.session(ctx, done)
	if err != nil {
		return nil, err
	}
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := sess.Open()
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("open stream: %w", r.err)
		}
		return muxStream{r.c}, nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, fmt.Errorf("open stream: %w", ctx.Err())
	}
}

// Close ends the session and refuses new ones.
func (s *serialLink) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	if s.sess != nil {
		s.sess.Close()
		s.conn.Close()
		s.sess, s.conn = nil, nil
	}
	close(s.changed)
	s.changed = make(chan struct{})
	return nil
}

// muxStream is a streammux stream. Its Close already is a half-close (a
// FIN: reads go on until the guest's FIN), so that is its CloseWrite too.
type muxStream struct{ net.Conn }

func (m muxStream) CloseWrite() error { return m.Conn.Close() }
