package guest

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// consoleWriter carries the guest's logs to the console. While no console
// is attached (the kernel found none at boot: console=hvc0 before
// virtio_console is loaded) it buffers, up to a limit, and flushes the
// buffer when one is attached.
type consoleWriter struct {
	mu  sync.Mutex
	out io.Writer // nil while buffering
	buf []byte
}

const consoleBufferLimit = 1 << 20

func (c *consoleWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.out == nil {
		if len(c.buf)+len(p) <= consoleBufferLimit {
			c.buf = append(c.buf, p...)
		}
		return len(p), nil
	}
	// A console that fails must not fail the logger (or PID 1).
	_, _ = c.out.Write(p)
	return len(p), nil
}

func (c *consoleWriter) attach(w io.Writer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.out = w
	if len(c.buf) > 0 {
		_, _ = w.Write(c.buf)
		c.buf = nil
	}
}

func (c *consoleWriter) attached() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out != nil
}

// stderrIsConsole reports whether fd 2 is a usable console rather than the
// /dev/null the Go runtime opens when the kernel started init without one.
func stderrIsConsole() bool {
	var st unix.Stat_t
	if err := unix.Fstat(2, &st); err != nil {
		return false
	}
	if st.Mode&unix.S_IFMT == unix.S_IFCHR && unix.Major(st.Rdev) == 1 && unix.Minor(st.Rdev) == 3 {
		return false // /dev/null
	}
	return true
}

// openConsole opens the first console device that works and makes it fds
// 0, 1 and 2 (so child processes log there too).
func openConsole(names []string) (*os.File, error) {
	var errs []error
	for _, name := range names {
		path := "/dev/" + name
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOCTTY, 0)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for fd := 0; fd <= 2; fd++ {
			if err := unix.Dup3(int(f.Fd()), fd, 0); err != nil {
				f.Close()
				return nil, fmt.Errorf("dup %s to fd %d: %w", path, fd, err)
			}
		}
		f.Close()
		return os.NewFile(2, path), nil
	}
	return nil, fmt.Errorf("no console among %v: %v", names, errs)
}

// bootClock returns the time since the kernel started (CLOCK_BOOTTIME),
// the natural clock for boot logs.
func bootClock() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// newLogger logs as text to w, with the time since boot ("up=1.234s")
// instead of the wall clock, and a "proc" attribute naming the process.
func newLogger(w io.Writer, level slog.Leveler, proc string) *slog.Logger {
	h := slog.NewTextHandler(w, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.String("up", fmt.Sprintf("%.3fs", bootClock().Seconds()))
			}
			return a
		},
	})
	return slog.New(h).With("proc", proc)
}
