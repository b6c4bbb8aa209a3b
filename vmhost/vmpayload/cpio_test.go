package vmpayload

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/actiond/actiond/internal/testutil"
)

// readNewc parses a newc archive (for tests): path → (mode, data, rdev).
type cpioFile struct {
	mode         uint32
	data         string
	rmaj, rminor uint32
}

func readNewc(t *testing.T, b []byte) ([]string, map[string]cpioFile) {
	t.Helper()
	var order []string
	files := map[string]cpioFile{}
	off := 0
	field := func(i int) uint32 {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+6+8*i+8]), 16, 32)
		if err != nil {
			t.Fatalf("bad header field %d at %d: %v", i, off, err)
		}
		return uint32(v)
	}
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d: %q", off, b[off:off+6])
		}
		mode, size, rmaj, rmin, namesize := field(1), field(6), field(9), field(10), field(11)
		name := string(b[off+110 : off+110+int(namesize)-1])
		dataOff := align(off + 110 + int(namesize))
		data := string(b[dataOff : dataOff+int(size)])
		off = align(dataOff + int(size))
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return order, files
		}
		order = append(order, name)
		files[name] = cpioFile{mode, data, rmaj, rmin}
	}
}

func TestWriteCpio(t *testing.T) {
	src := filepath.Join(t.TempDir(), "bin")
	if err := os.WriteFile(src, []byte("ELF!"), 0o644); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	err := writeCpio(&buf, []entry{
		{Path: "/usr/sbin/mkfs.ext4", Link: "mke2fs"},
		{Path: "/init", Mode: 0o755, Source: src},
		{Path: "/dev/console", Char: true, Major: 5, Minor: 1, Mode: 0o600},
		{Path: "/tmp", Dir: true, Mode: 0o1777},
		{Path: "/lib/modules/6.1/modules.dep", Mode: 0o644, Data: []byte("a.ko:\n")},
		{Path: "/usr/sbin/mke2fs", Mode: 0o755, Data: []byte("odd length")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", buf.Len())
	}
	order, files := readNewc(t, buf.Bytes())
	want := []string{"dev", "dev/console", "init", "lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/modules.dep", "tmp", "usr", "usr/sbin", "usr/sbin/mke2fs", "usr/sbin/mkfs.ext4"}
	if strings.Join(order, " ") != strings.Join(want, " ") {
		t.Errorf("order:\n got %v\nwant %v", order, want)
	}
	check := func(name string, mode uint32, data string) {
		t.Helper()
		f, ok := files[name]
		if !ok || f.mode != mode || f.data != data {
			t.Errorf("%s: got mode %o data %q, want %o %q", name, f.mode, f.data, mode, data)
		}
	}
	check("init", sIFREG|0o755, "ELF!")
	check("usr/sbin/mkfs.ext4", sIFLNK|0o777, "mke2fs")
	check("tmp", sIFDIR|0o1777, "")
	check("lib", sIFDIR|0o755, "")
	check("usr/sbin/mke2fs", sIFREG|0o755, "odd length")
	if c := files["dev/console"]; c.mode != sIFCHR|0o600 || c.rmaj != 5 || c.rminor != 1 {
		t.Errorf("dev/console: %+v", c)
	}

	if err := writeCpio(io.Discard, []entry{{Path: "/a", Data: nil}, {Path: "a"}}); err == nil {
		t.Error("duplicate path accepted")
	}
}

// TestWriteCpioGNU cross-checks the archive with GNU cpio, when installed.
func TestWriteCpioGNU(t *testing.T) {
	_, err := exec.LookPath("cpio")
	testutil.Require(t, err == nil, "GNU cpio not installed (Debian: apt-get install cpio)")
	var buf bytes.Buffer
	if err := writeCpio(&buf, []entry{
		{Path: "/init", Mode: 0o755, Data: []byte("#!/bin/sh\n")},
		{Path: "/etc/x", Mode: 0o644, Data: []byte("x")},
		{Path: "/bin/sh", Link: "busybox"},
	}); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cpio", "-t", "-v")
	cmd.Stdin = &buf
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t: %v\n%s", err, out)
	}
	for _, want := range []string{"init", "etc/x", "bin/sh -> busybox"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("cpio -t output lacks %q:\n%s", want, out)
		}
	}
}
