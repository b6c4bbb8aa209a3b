package vmpayload

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// The x86 kernel's vmlinuz carries its ELF as an xz stream whose filter
// chain is x86 BCJ then LZMA2 (scripts/xz_wrap.sh: xz --x86 --lzma2).
// Go's xz package decodes LZMA2 but has no BCJ filter, so decodeXZ reads
// the xz container itself, lets package lzma decode the LZMA2 data, and
// undoes the BCJ filter (x86BCJDecode). Streams without a BCJ filter go to
// package xz as they are.

const (
	xzFilterX86   = 0x04
	xzFilterLZMA2 = 0x21
)

// decodeXZ decodes the first xz stream in data (trailing bytes ignored).
func decodeXZ(data []byte) ([]byte, error) {
	if len(data) < 12 || !bytes.Equal(data[:6], xzMagic) {
		return nil, errors.New("no xz stream header")
	}
	if crc32.ChecksumIEEE(data[6:8]) != binary.LittleEndian.Uint32(data[8:12]) {
		return nil, errors.New("xz stream header: bad CRC32")
	}
	p := data[12:]
	if len(p) < 1 || p[0] == 0 {
		return nil, errors.New("xz: no block")
	}
	hsize := (int(p[0]) + 1) * 4
	if len(p) < hsize {
		return nil, errors.New("xz block header: truncated")
	}
	hdr := p[:hsize]
	if crc32.ChecksumIEEE(hdr[:hsize-4]) != binary.LittleEndian.Uint32(hdr[hsize-4:]) {
		return nil, errors.New("xz block header: bad CRC32")
	}
	flags := hdr[1]
	nfilters := int(flags&3) + 1
	q := bytes.NewReader(hdr[2 : hsize-4])
	if flags&0x40 != 0 {
		if _, err := binary.ReadUvarint(q); err != nil {
			return nil, fmt.Errorf("xz block header: compressed size: %w", err)
		}
	}
	if flags&0x80 != 0 {
		if _, err := binary.ReadUvarint(q); err != nil {
			return nil, fmt.Errorf("xz block header: uncompressed size: %w", err)
		}
	}
	type filter struct {
		id    uint64
		props []byte
	}
	var filters []filter
	for range nfilters {
		id, err := binary.ReadUvarint(q)
		if err != nil {
			return nil, fmt.Errorf("xz filter flags: %w", err)
		}
		n, err := binary.ReadUvarint(q)
		if err != nil || n > 16 {
			return nil, fmt.Errorf("xz filter flags: properties size %d: %v", n, err)
		}
		props := make([]byte, n)
		if _, err := io.ReadFull(q, props); err != nil {
			return nil, fmt.Errorf("xz filter flags: %w", err)
		}
		filters = append(filters, filter{id, props})
	}
	last := filters[len(filters)-1]
	if last.id != xzFilterLZMA2 || len(last.props) != 1 {
		return nil, fmt.Errorf("xz: last filter is %#x, want LZMA2", last.id)
	}
	if len(filters) == 1 {
		// Plain LZMA2: package xz handles the whole stream (and checks it).
		r, err := xz.ReaderConfig{SingleStream: true}.NewReader(bufio.NewReaderSize(bytes.NewReader(data), 1<<20))
		if err != nil {
			return nil, err
		}
		return io.ReadAll(r)
	}
	if len(filters) != 2 || filters[0].id != xzFilterX86 {
		return nil, fmt.Errorf("xz: filter chain %#x: only LZMA2 or x86 BCJ + LZMA2 are supported", filters[0].id)
	}
	start := uint32(0)
	switch len(filters[0].props) {
	case 0:
	case 4:
		start = binary.LittleEndian.Uint32(filters[0].props)
	default:
		return nil, errors.New("xz: x86 BCJ filter: bad properties")
	}
	dictCap, err := lzma2DictSize(last.props[0])
	if err != nil {
		return nil, err
	}
	r, err := lzma.Reader2Config{DictCap: dictCap}.NewReader2(bufio.NewReaderSize(bytes.NewReader(p[hsize:]), 1<<20))
	if err != nil {
		return nil, fmt.Errorf("xz: LZMA2: %w", err)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("xz: LZMA2: %w", err)
	}
	x86BCJDecode(out, start)
	return out, nil
}

// lzma2DictSize decodes the LZMA2 dictionary size property.
func lzma2DictSize(b byte) (int, error) {
	if b > 40 {
		return 0, fmt.Errorf("xz: LZMA2 dictionary size property %d > 40", b)
	}
	if b == 40 {
		return 0xFFFFFFFF, nil
	}
	return (2 | int(b&1)) << (b/2 + 11), nil
}

// x86BCJDecode undoes xz's x86 branch converter in place: the encoder
// replaced the relative 32-bit target of E8 (call) and E9 (jmp)
// instructions by an absolute one (position + 5 + offset) when the
// target's top byte is 0x00 or 0xFF, tracking in a bit mask which of the
// previous bytes were E8/E9 so that operands which look like opcodes are
// treated as the encoder treated them. pos is the stream's start offset.
func x86BCJDecode(buf []byte, pos uint32) {
	// allowed[mask] tells whether a conversion may happen given the last
	// three bytes' E8/E9 pattern; bitNumber gives the byte to test when
	// undoing a nested conversion.
	allowed := [8]bool{true, true, true, false, true, false, false, false}
	bitNumber := [8]uint32{0, 1, 2, 2, 3, 3, 3, 3}
	msb := func(b byte) bool { return b == 0 || b == 0xFF }
	if len(buf) < 5 {
		return
	}
	var mask uint32
	prev := pos - 5 // "no E8/E9 seen yet"
	for i := 0; i <= len(buf)-5; {
		if buf[i] != 0xE8 && buf[i] != 0xE9 {
			i++
			continue
		}
		cur := pos + uint32(i)
		if d := cur - prev; d > 5 {
			mask = 0
		} else {
			for range d {
				mask = (mask & 0x77) << 1
			}
		}
		prev = cur
		b := buf[i+4]
		if msb(b) && allowed[(mask>>1)&7] && mask>>1 < 0x10 {
			src := binary.LittleEndian.Uint32(buf[i+1:])
			var dest uint32
			for {
				dest = src - (cur + 5)
				if mask == 0 {
					break
				}
				n := bitNumber[mask>>1]
				if !msb(byte(dest >> (24 - n*8))) {
					break
				}
				src = dest ^ (1<<(32-n*8) - 1)
			}
			// Bit 24 of the target decides the sign byte.
			dest &= 0x01FFFFFF
			if dest&0x01000000 != 0 {
				dest |= 0xFF000000
			}
			binary.LittleEndian.PutUint32(buf[i+1:], dest)
			i += 5
			mask = 0
		} else {
			i++
			mask |= 1
			if msb(b) {
				mask |= 0x10
			}
		}
	}
}
