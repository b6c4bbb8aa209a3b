package guest

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/internal/streammux"
)

// vmaddrCIDAny is what the kernel reports as the local CID when no guest
// vsock transport (device) is present.
const vmaddrCIDAny = 0xFFFFFFFF

// vsockCID returns the guest's vsock context ID, or false when the VM has
// no vsock device.
func vsockCID() (uint32, bool) {
	cid, err := vsock.ContextID()
	if err != nil || cid == vmaddrCIDAny || cid <= 2 {
		return 0, false
	}
	return cid, true
}

// Listen returns the listener for the host transport cfg selects: AF_VSOCK
// on cfg.VsockPort, or the virtio-serial port cfg.SerialName multiplexed
// with streammux (each host stream is one connection). With
// TransportAuto, vsock is used when the VM has a vsock device. The second
// result names the transport for logs.
func Listen(cfg Config, log *slog.Logger) (net.Listener, string, error) {
	transport := cfg.Transport
	if transport == TransportAuto || transport == "" {
		transport = TransportSerial
		if _, ok := vsockCID(); ok {
			transport = TransportVsock
		}
	}
	switch transport {
	case TransportVsock:
		cid, ok := vsockCID()
		if !ok {
			return nil, "", fmt.Errorf("actiond.transport=vsock but the VM has no vsock device (no guest CID; is vmw_vsock_virtio_transport loaded?)")
		}
		l, err := vsock.Listen(cfg.VsockPort, nil)
		if err != nil {
			return nil, "", fmt.Errorf("listen on vsock port %d: %w", cfg.VsockPort, err)
		}
		return l, fmt.Sprintf("vsock cid %d port %d", cid, cfg.VsockPort), nil
	case TransportSerial:
		dev, err := findSerialPort(cfg.SerialName, 10*time.Second)
		if err != nil {
			return nil, "", err
		}
		l := newSerialListener(dev, func() (io.ReadWriteCloser, error) { return openPort(dev) }, log, serialPoll)
		return l, "virtio-serial " + dev + " (" + cfg.SerialName + ")", nil
	}
	return nil, "", fmt.Errorf("unknown transport %q", transport)
}

// findSerialPort returns the device of the virtio-serial port with the
// given name (/sys/class/virtio-ports/vportNpM/name), waiting up to
// timeout for it to appear.
func findSerialPort(name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		matches, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		var seen []string
		for _, m := range matches {
			got := readSysString(m)
			port := filepath.Base(filepath.Dir(m))
			seen = append(seen, port+"="+got)
			if got == name {
				dev := "/dev/" + port
				if exists(dev) {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-serial port named %q (ports: %v); attach one (QEMU: -device virtserialport,name=%s) or use vsock", name, seen, name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// openPort opens a virtio-serial port non-blocking, so that the Go poller
// can interrupt pending reads and writes when a session ends.
func openPort(dev string) (io.ReadWriteCloser, error) {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dev, err)
	}
	return os.NewFile(uintptr(fd), dev), nil
}

// serialListener serves host sessions over a virtio-serial port, one after
// the other: the host connects (the first bytes arrive), streammux runs
// over the port until the host disconnects (a read returns 0), then the
// port is closed (which discards unread data) and reopened for the next
// host. The listener outlives sessions, so a gRPC server keeps serving
// across host restarts.
//
// A virtio-serial read returns 0 while no host is connected, and writes
// block until one is; waitForHost polls for the first bytes rather than
// treating 0 as the end.
type serialListener struct {
	dev   string
	open  func() (io.ReadWriteCloser, error)
	log   *slog.Logger
	poll  time.Duration
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once

	mu   sync.Mutex
	port io.Closer // the port of the current session, closed by Close
}

// serialPoll is how often a port without a host is read again.
const serialPoll = 20 * time.Millisecond

func newSerialListener(dev string, open func() (io.ReadWriteCloser, error), log *slog.Logger, poll time.Duration) *serialListener {
	l := &serialListener{
		dev:   dev,
		open:  open,
		log:   log,
		poll:  poll,
		conns: make(chan net.Conn),
		done:  make(chan struct{}),
	}
	go l.run()
	return l
}

func (l *serialListener) closed() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

func (l *serialListener) run() {
	for session := 1; !l.closed(); session++ {
		port, err := l.open()
		if err != nil {
			l.log.Error("cannot open the host port; retrying", "port", l.dev, "err", err)
			l.sleep(time.Second)
			continue
		}
		l.mu.Lock()
		l.port = port
		l.mu.Unlock()
		first, err := l.waitForHost(port)
		if err != nil {
			port.Close()
			if !l.closed() {
				l.log.Error("host port failed; reopening", "port", l.dev, "err", err)
				l.sleep(time.Second)
			}
			continue
		}
		l.log.Info("host connected", "port", l.dev, "session", session)
		sess, err := streammux.Listen(&prefixedPort{port: port, pending: first})
		if err != nil {
			port.Close()
			l.log.Error("stream multiplexer failed", "err", err)
			continue
		}
		for {
			c, err := sess.Accept()
			if err != nil {
				break
			}
			select {
			case l.conns <- c:
			case <-l.done:
				c.Close()
			}
		}
		sess.Close() // closes the port
		if !l.closed() {
			l.log.Info("host disconnected; waiting for the next connection", "port", l.dev, "session", session)
		}
	}
}

func (l *serialListener) sleep(d time.Duration) {
	select {
	case <-time.After(d):
	case <-l.done:
	}
}

// waitForHost reads until the host sends something; reads return 0 (EOF)
// while no host is connected.
func (l *serialListener) waitForHost(port io.Reader) ([]byte, error) {
	buf := make([]byte, 64<<10)
	for !l.closed() {
		n, err := port.Read(buf)
		if n > 0 {
			return buf[:n], nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		l.sleep(l.poll)
	}
	return nil, net.ErrClosed
}

// Accept returns the next stream the host opens.
func (l *serialListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops accepting streams. The current session stays up: a gRPC
// server closes its listener first when it stops gracefully and then
// finishes the calls in flight on the streams it has (the reply to a
// PowerOff among them). The port closes when the process exits, or with
// closeSession.
func (l *serialListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

// closeSession ends the current session, if any (after Close).
func (l *serialListener) closeSession() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.port != nil {
		l.port.Close()
	}
}

func (l *serialListener) Addr() net.Addr { return serialAddr(l.dev) }

type serialAddr string

func (a serialAddr) Network() string { return "virtio-serial" }
func (a serialAddr) String() string  { return string(a) }

// prefixedPort is a session's view of the port: the bytes waitForHost
// already read come first, and a read of 0 (the host went away) is the end.
type prefixedPort struct {
	port    io.ReadWriteCloser
	pending []byte
}

func (p *prefixedPort) Read(b []byte) (int, error) {
	if len(p.pending) > 0 {
		n := copy(b, p.pending)
		p.pending = p.pending[n:]
		return n, nil
	}
	n, err := p.port.Read(b)
	if n == 0 && err == nil {
		err = io.EOF
	}
	return n, err
}

func (p *prefixedPort) Write(b []byte) (int, error) { return p.port.Write(b) }
func (p *prefixedPort) Close() error                { return p.port.Close() }
