package vmhost

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"sync"
)

// Console collects a VM's console output: every byte goes to a Ring (the
// tail quoted when the VM fails) and to an optional file, and every line is
// logged at debug level. Backends copy the serial port's output into it.
type Console struct {
	ring *Ring
	log  *slog.Logger
	attr string

	mu      sync.Mutex
	partial []byte
	file    io.Writer
}

// maxLine bounds a line kept for the logger; a longer one is logged in pieces.
const maxLine = 4096

// NewConsole returns a console keeping a tail of ringSize bytes (see
// NewRing) and logging lines to log (slog.Default() when nil) with the
// attribute source=source.
func NewConsole(log *slog.Logger, source string, ringSize int) *Console {
	if log == nil {
		log = slog.Default()
	}
	return &Console{ring: NewRing(ringSize), log: log, attr: source}
}

// SetFile also copies the raw output to w (e.g. <root>/console.log); nil
// stops that.
func (c *Console) SetFile(w io.Writer) {
	c.mu.Lock()
	c.file = w
	c.mu.Unlock()
}

// Write records p. It never fails: a VM must not stall on its console.
func (c *Console) Write(p []byte) (int, error) {
	c.ring.Write(p)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.file != nil {
		if _, err := c.file.Write(p); err != nil {
			c.file = nil
			c.log.Warn("console file write failed; no longer copying the console to it", "err", err)
		}
	}
	data := p
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			c.partial = append(c.partial, data...)
			for len(c.partial) >= maxLine {
				c.emit(c.partial[:maxLine])
				c.partial = c.partial[:copy(c.partial, c.partial[maxLine:])]
			}
			break
		}
		line := data[:i]
		if len(c.partial) > 0 {
			line = append(c.partial, line...)
		}
		c.emit(line)
		c.partial = c.partial[:0]
		data = data[i+1:]
	}
	return len(p), nil
}

// Flush logs a pending partial line.
func (c *Console) Flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.partial) > 0 {
		c.emit(c.partial)
		c.partial = c.partial[:0]
	}
}

func (c *Console) emit(line []byte) {
	line = bytes.TrimRight(line, "\r")
	if len(line) == 0 {
		return
	}
	level := slog.LevelDebug
	if isProgressLine(line) {
		level = slog.LevelInfo
	}
	if !c.log.Enabled(context.Background(), level) {
		return
	}
	c.log.Log(context.Background(), level, string(line), "source", c.attr)
}

// progressMarkers start the messages of the guest's long first-boot work
// (preparing runtimes: minutes under emulation), which the console logs at
// info rather than debug, so that a user sees what the VM is doing.
var progressMarkers = [][]byte{[]byte(`msg="runtime`), []byte(`msg="preparing runtimes`), []byte(`msg="action waits for its runtime`)}

func isProgressLine(line []byte) bool {
	for _, m := range progressMarkers {
		if bytes.Contains(line, m) {
			return true
		}
	}
	return false
}

// Ring is the console's tail buffer.
func (c *Console) Ring() *Ring { return c.ring }

// Tail returns the last lines of the console (see Ring.Tail).
func (c *Console) Tail(maxLines int) string { return c.ring.Tail(maxLines) }

// Copy copies r into the console until EOF or an error, then flushes the
// pending line. Backends run it on the serial port's read side.
func (c *Console) Copy(r io.Reader) error {
	_, err := io.Copy(c, r)
	c.Flush()
	return err
}
