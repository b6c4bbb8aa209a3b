package vmhost

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

func TestRingKeepsTail(t *testing.T) {
	r := NewRing(10)
	r.Write([]byte("abc"))
	if got := string(r.Bytes()); got != "abc" {
		t.Fatalf("got %q", got)
	}
	r.Write([]byte("defghij")) // exactly full
	if got := string(r.Bytes()); got != "abcdefghij" {
		t.Fatalf("got %q", got)
	}
	r.Write([]byte("kl")) // wraps
	if got := string(r.Bytes()); got != "cdefghijkl" {
		t.Fatalf("got %q", got)
	}
	r.Write([]byte("0123456789ABCDEF")) // larger than the ring
	if got := string(r.Bytes()); got != "6789ABCDEF" {
		t.Fatalf("got %q", got)
	}
	if r.Total() != 28 {
		t.Fatalf("total %d", r.Total())
	}
}

func TestRingMatchesNaiveTail(t *testing.T) {
	for _, size := range []int{1, 7, 64} {
		r := NewRing(size)
		var all bytes.Buffer
		for i := range 200 {
			chunk := bytes.Repeat([]byte{byte('a' + i%26)}, i%13)
			r.Write(chunk)
			all.Write(chunk)
			want := all.Bytes()[max(0, all.Len()-size):]
			if got := r.Bytes(); !bytes.Equal(got, want) {
				t.Fatalf("size %d after %d writes: got %q want %q", size, i, got, want)
			}
		}
	}
}

func TestRingTailLines(t *testing.T) {
	r := NewRing(32)
	r.Write([]byte("first line that will be cut\r\nline 2\r\nline 3\nline 4\n"))
	// The ring holds "...be cut\r\nline 2..." : the cut first line is dropped.
	if got := r.Tail(0); got != "line 2\nline 3\nline 4" {
		t.Fatalf("Tail(0) = %q", got)
	}
	if got := r.Tail(2); got != "line 3\nline 4" {
		t.Fatalf("Tail(2) = %q", got)
	}
	r2 := NewRing(100)
	r2.Write([]byte("a\nb\npartial"))
	if got := r2.Tail(2); got != "b\npartial" {
		t.Fatalf("Tail(2) with a partial line = %q", got)
	}
}

func TestRingConcurrentWrites(t *testing.T) {
	r := NewRing(1 << 10)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 1000 {
				r.Write([]byte(fmt.Sprintf("writer %d\n", i)))
			}
		}()
	}
	wg.Wait()
	if r.Total() != 8*1000*9 {
		t.Fatalf("total %d", r.Total())
	}
	for _, l := range strings.Split(r.Tail(0), "\n") {
		if !strings.HasPrefix(l, "writer ") {
			t.Fatalf("torn line %q", l)
		}
	}
}

// recordHandler collects log records.
type recordHandler struct {
	mu    sync.Mutex
	lines []string
}

func (h *recordHandler) Enabled(_ context.Context, l slog.Level) bool { return true }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.lines = append(h.lines, r.Message)
	h.mu.Unlock()
	return nil
}
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

func TestConsoleLogsLinesAndKeepsTail(t *testing.T) {
	h := &recordHandler{}
	c := NewConsole(slog.New(h), "guest", 64)
	var file bytes.Buffer
	c.SetFile(&file)
	io.WriteString(c, "boot")
	io.WriteString(c, "ing\r\nsecond\n\nthird")
	c.Flush()
	want := []string{"booting", "second", "third"}
	if fmt.Sprint(h.lines) != fmt.Sprint(want) {
		t.Fatalf("logged %q, want %q", h.lines, want)
	}
	if file.String() != "booting\r\nsecond\n\nthird" {
		t.Fatalf("file got %q", file.String())
	}
	if got := c.Tail(2); got != "\nthird" && got != "third" {
		// An empty line counts as a line.
		t.Fatalf("tail %q", got)
	}
	long := strings.Repeat("x", 3*maxLine)
	io.WriteString(c, long)
	if n := len(h.lines); n < 5 {
		t.Fatalf("a %d-byte line without newline was not logged in pieces (%d records)", len(long), n)
	}
}

// TestConsoleProgressAtInfo: the guest's runtime-preparation lines reach a
// logger at info level; the rest of the console stays at debug.
func TestConsoleProgressAtInfo(t *testing.T) {
	var out bytes.Buffer
	c := NewConsole(slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelInfo})), "guest", 0)
	io.WriteString(c, "up=7.2s level=INFO msg=\"modules loaded\" proc=init\n")
	io.WriteString(c, "up=7.3s level=INFO msg=\"runtime: extracting (first boot with this version)\" runtime=glibc2.36\n")
	io.WriteString(c, "up=9.1s level=INFO msg=\"preparing runtimes in the background\" runtimes=[glibc2.36]\n")
	got := out.String()
	if strings.Contains(got, "modules loaded") {
		t.Errorf("an ordinary console line was logged at info:\n%s", got)
	}
	if !strings.Contains(got, "runtime: extracting") || !strings.Contains(got, "preparing runtimes") {
		t.Errorf("runtime preparation lines not logged at info:\n%s", got)
	}
}
