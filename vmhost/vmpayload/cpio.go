package vmpayload

import (
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// entry is one file of the initramfs. Exactly one kind applies: Dir, Link
// (symlink target), Char (device node), else a regular file from Source or
// Data.
type entry struct {
	Path   string // absolute path in the image, e.g. /init
	Mode   uint32 // permission bits
	Dir    bool
	Link   string
	Char   bool
	Major  uint32
	Minor  uint32
	Source string // host file to copy
	Data   []byte // inline content
}

// newc mode type bits.
const (
	sIFDIR = 0o040000
	sIFREG = 0o100000
	sIFLNK = 0o120000
	sIFCHR = 0o020000
)

// cpioWriter writes the "newc" (SVR4, no CRC) cpio format the kernel
// unpacks into its initial root: per file a 110-byte ASCII header
// ("070701" and 13 eight-digit hex fields), the NUL-terminated name padded
// to 4 bytes, the data padded to 4 bytes; ended by "TRAILER!!!".
type cpioWriter struct {
	w   io.Writer
	n   int64
	ino uint32
}

func (c *cpioWriter) write(b []byte) error {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return err
}

func (c *cpioWriter) pad() error {
	if r := c.n % 4; r != 0 {
		return c.write(make([]byte, 4-r))
	}
	return nil
}

// header writes a header and name; the caller writes size bytes of data
// and then pads.
func (c *cpioWriter) header(name string, mode uint32, nlink uint32, size int64, rmajor, rminor uint32) error {
	if size > 0xFFFFFFFF {
		return fmt.Errorf("cpio: %s is larger than 4 GiB", name)
	}
	c.ino++
	// All files owned by root, mtime 0: the image is reproducible.
	h := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, len(name)+1, 0)
	if err := c.write([]byte(h)); err != nil {
		return err
	}
	if err := c.write(append([]byte(name), 0)); err != nil {
		return err
	}
	return c.pad()
}

// writeEntry writes one entry.
func (c *cpioWriter) writeEntry(e entry) error {
	name := strings.TrimPrefix(path.Clean(e.Path), "/")
	perm := e.Mode & 0o7777
	switch {
	case e.Dir:
		return c.header(name, sIFDIR|perm, 2, 0, 0, 0)
	case e.Link != "":
		if err := c.header(name, sIFLNK|0o777, 1, int64(len(e.Link)), 0, 0); err != nil {
			return err
		}
		if err := c.write([]byte(e.Link)); err != nil {
			return err
		}
		return c.pad()
	case e.Char:
		return c.header(name, sIFCHR|perm, 1, 0, e.Major, e.Minor)
	}
	data := e.Data
	if e.Source != "" {
		var err error
		if data, err = os.ReadFile(e.Source); err != nil {
			return fmt.Errorf("cpio: %w", err)
		}
	}
	if err := c.header(name, sIFREG|perm, 1, int64(len(data)), 0, 0); err != nil {
		return err
	}
	if err := c.write(data); err != nil {
		return err
	}
	return c.pad()
}

// close writes the trailer.
func (c *cpioWriter) close() error {
	return c.header("TRAILER!!!", 0, 1, 0, 0, 0)
}

// writeCpio writes entries as a newc archive, with every missing parent
// directory added (mode 0755) and parents before children. Duplicate paths
// are an error.
func writeCpio(w io.Writer, entries []entry) error {
	all := map[string]entry{}
	for _, e := range entries {
		p := path.Clean("/" + e.Path)
		if p == "/" {
			continue
		}
		e.Path = p
		if prev, dup := all[p]; dup && !(prev.Dir && e.Dir) {
			return fmt.Errorf("cpio: %s added twice", p)
		}
		all[p] = e
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			if _, ok := all[d]; !ok {
				all[d] = entry{Path: d, Dir: true, Mode: 0o755}
			}
		}
	}
	paths := make([]string, 0, len(all))
	for p := range all {
		paths = append(paths, p)
	}
	// Sorting by components puts a directory right before its content.
	sort.Slice(paths, func(i, j int) bool { return lessComponents(paths[i], paths[j]) })
	c := &cpioWriter{w: w}
	for _, p := range paths {
		if err := c.writeEntry(all[p]); err != nil {
			return err
		}
	}
	return c.close()
}

func lessComponents(a, b string) bool {
	as, bs := strings.Split(a, "/"), strings.Split(b, "/")
	for i := 0; i < len(as) && i < len(bs); i++ {
		if as[i] != bs[i] {
			return as[i] < bs[i]
		}
	}
	return len(as) < len(bs)
}
