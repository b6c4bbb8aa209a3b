package debian

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// Deb is an opened .deb file: an ar archive of debian-binary,
// control.tar[.xz|.gz|.zst] and data.tar[.xz|.gz|.zst].
type Deb struct {
	Path string
	// Control is the parsed control file.
	Control Paragraph
	// ControlFiles are the other members of control.tar (md5sums,
	// conffiles, maintainer scripts, ...) by name, with their modes.
	ControlFiles map[string]ControlFile
	f            *os.File
	dataOff      int64
	dataSize     int64
	dataName     string
}

// ControlFile is one member of control.tar.
type ControlFile struct {
	Mode int64
	Data []byte
}

// Conffiles lists the package's conffiles (absolute paths).
func (d *Deb) Conffiles() []string {
	var out []string
	for _, l := range strings.Split(string(d.ControlFiles["conffiles"].Data), "\n") {
		l = strings.TrimSpace(l)
		// "remove-on-upgrade /etc/x" lines (dpkg 1.20.1+) are flags.
		if f := strings.Fields(l); len(f) == 2 {
			l = f[1]
		}
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}

// OpenDeb opens a .deb and reads its control archive.
func OpenDeb(path string) (*Deb, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	d := &Deb{Path: path, f: f, ControlFiles: map[string]ControlFile{}}
	if err := d.readAr(); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return d, nil
}

// Close closes the file.
func (d *Deb) Close() error { return d.f.Close() }

func (d *Deb) readAr() error {
	magic := make([]byte, 8)
	if _, err := io.ReadFull(d.f, magic); err != nil || string(magic) != "!<arch>\n" {
		return errors.New("not a .deb (no ar magic)")
	}
	off := int64(8)
	var sawControl bool
	for {
		hdr := make([]byte, 60)
		if _, err := d.f.ReadAt(hdr, off); err != nil {
			if err == io.EOF {
				break
			}
			return fmt.Errorf("ar header at %d: %w", off, err)
		}
		if string(hdr[58:60]) != "`\n" {
			return fmt.Errorf("ar header at %d: bad magic", off)
		}
		name := strings.TrimRight(strings.TrimSpace(string(hdr[0:16])), "/")
		size, err := strconv.ParseInt(strings.TrimSpace(string(hdr[48:58])), 10, 64)
		if err != nil || size < 0 {
			return fmt.Errorf("ar member %q: bad size", name)
		}
		dataOff := off + 60
		switch {
		case name == "debian-binary":
			v := make([]byte, min(size, 16))
			if _, err := d.f.ReadAt(v, dataOff); err != nil {
				return err
			}
			if !strings.HasPrefix(string(v), "2.") {
				return fmt.Errorf("unsupported .deb format %q", strings.TrimSpace(string(v)))
			}
		case strings.HasPrefix(name, "control.tar"):
			if err := d.readControl(name, io.NewSectionReader(d.f, dataOff, size)); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			sawControl = true
		case strings.HasPrefix(name, "data.tar"):
			d.dataOff, d.dataSize, d.dataName = dataOff, size, name
		}
		off = dataOff + size + size%2
	}
	if !sawControl || d.dataName == "" {
		return errors.New("no control.tar or data.tar member")
	}
	return nil
}

func (d *Deb) readControl(name string, r io.Reader) error {
	zr, closeFn, err := decompressor(name, r)
	if err != nil {
		return err
	}
	defer closeFn()
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		data, err := io.ReadAll(io.LimitReader(tr, 64<<20))
		if err != nil {
			return err
		}
		base := strings.TrimPrefix(h.Name, "./")
		if base == "control" {
			paras, err := ParseParagraphs(data)
			if err != nil || len(paras) != 1 {
				return fmt.Errorf("control file: %v (%d paragraphs)", err, len(paras))
			}
			d.Control = paras[0]
			continue
		}
		d.ControlFiles[base] = ControlFile{Mode: h.Mode, Data: data}
	}
	if d.Control == nil {
		return errors.New("no control file")
	}
	return nil
}

// Data calls fn for every entry of data.tar, in archive order, with the
// entry's content for regular files. Names are as in the archive
// ("./usr/bin/bash").
func (d *Deb) Data(fn func(h *tar.Header, r io.Reader) error) error {
	zr, closeFn, err := decompressor(d.dataName, io.NewSectionReader(d.f, d.dataOff, d.dataSize))
	if err != nil {
		return fmt.Errorf("%s: %w", d.Path, err)
	}
	defer closeFn()
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %s: %w", d.Path, d.dataName, err)
		}
		if err := fn(h, tr); err != nil {
			return err
		}
	}
}

// decompressor picks the decompression by the member's extension.
func decompressor(name string, r io.Reader) (io.Reader, func(), error) {
	br := bufio.NewReaderSize(r, 1<<20)
	switch {
	case strings.HasSuffix(name, ".xz"):
		zr, err := xz.NewReader(br)
		return zr, func() {}, err
	case strings.HasSuffix(name, ".zst"):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, nil, err
		}
		return zr, zr.Close, nil
	case strings.HasSuffix(name, ".gz"):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, err
		}
		return zr, func() { zr.Close() }, nil
	case strings.HasSuffix(name, ".tar"):
		return br, func() {}, nil
	}
	return nil, nil, fmt.Errorf("unsupported compression of %s", name)
}
