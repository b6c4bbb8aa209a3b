package vmhost

import (
	"bytes"
	"sync"
)

// Ring keeps the last Size bytes written to it: the tail of a VM's console,
// quoted in error messages when the VM dies or never becomes ready. It is
// safe for concurrent use; writes never block or fail.
type Ring struct {
	mu    sync.Mutex
	buf   []byte // len(buf) == capacity once allocated
	start int    // index of the oldest byte
	n     int    // bytes held
	total int64  // bytes ever written
}

// DefaultRingSize is the console tail kept by NewRing(0).
const DefaultRingSize = 64 << 10

// NewRing returns a ring that holds the last size bytes (DefaultRingSize
// when size <= 0).
func NewRing(size int) *Ring {
	if size <= 0 {
		size = DefaultRingSize
	}
	return &Ring{buf: make([]byte, size)}
}

// Write appends p, dropping the oldest bytes beyond the capacity.
func (r *Ring) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := len(p)
	r.total += int64(n)
	c := len(r.buf)
	if n >= c {
		copy(r.buf, p[n-c:])
		r.start, r.n = 0, c
		return n, nil
	}
	end := (r.start + r.n) % c
	k := copy(r.buf[end:], p)
	copy(r.buf, p[k:])
	r.n += n
	if r.n > c {
		r.start = (r.start + r.n - c) % c
		r.n = c
	}
	return n, nil
}

// Bytes returns a copy of the bytes held, oldest first.
func (r *Ring) Bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]byte, r.n)
	k := copy(out, r.buf[r.start:min(r.start+r.n, len(r.buf))])
	copy(out[k:], r.buf[:r.n-k])
	return out
}

// Total is the number of bytes ever written.
func (r *Ring) Total() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}

// Tail returns up to the last maxLines complete or partial lines held (all
// of them when maxLines <= 0), without a partial first line when older
// bytes were dropped, and with carriage returns removed.
func (r *Ring) Tail(maxLines int) string {
	b := r.Bytes()
	if int64(len(b)) < r.Total() {
		// The first line was cut by the ring: drop it.
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	b = bytes.ReplaceAll(b, []byte("\r"), nil)
	b = bytes.TrimRight(b, "\n")
	if maxLines > 0 {
		lines := 0
		for i := len(b) - 1; i >= 0; i-- {
			if b[i] == '\n' {
				lines++
				if lines == maxLines {
					b = b[i+1:]
					break
				}
			}
		}
	}
	return string(b)
}
