package vmpayload

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"testing"
)

// x86Like returns deterministic bytes full of E8/E9 (call/jmp) opcodes
// with near targets, like machine code: what the x86 BCJ filter changes.
func x86Like(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	out := make([]byte, 0, n)
	for len(out) < n {
		switch r.IntN(4) {
		case 0, 1:
			op := byte(0xE8 + r.IntN(2))
			top := byte(0)
			if r.IntN(2) == 0 {
				top = 0xFF
			}
			out = append(out, op, byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256)), top)
		default:
			out = append(out, byte(r.IntN(256)))
		}
	}
	return out[:n]
}

// testdata/x86bcj.xz was made from x86Like(64<<10) by
//
//	xz --format=xz --check=crc32 --x86 --lzma2=preset=6
//
// (what the kernel's scripts/xz_wrap.sh does for x86). decodeXZ must give
// the input back, also with bytes before the stream (a bzImage's setup
// code) when found through kernelFromImage.
func TestDecodeXZWithX86BCJ(t *testing.T) {
	stream, err := os.ReadFile("testdata/x86bcj.xz")
	if err != nil {
		t.Fatal(err)
	}
	want := x86Like(64 << 10)
	got, err := decodeXZ(stream)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("decoded %d bytes, differ from the input (%d bytes)", len(got), len(want))
	}
	img := append(append([]byte("setup code \xfd7zXZ not a stream"), stream...), "trailer"...)
	got, err = kernelFromImage(img, func(b []byte) error {
		if len(b) != len(want) {
			return errors.New("wrong length")
		}
		return nil
	})
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("kernelFromImage: %v", err)
	}
	// The check refuses: the error says why.
	if _, err := kernelFromImage(img, func([]byte) error { return errors.New("no PVH") }); err == nil || !bytes.Contains([]byte(err.Error()), []byte("no PVH")) {
		t.Fatalf("refused stream: %v", err)
	}
	// The x86 filter matters: without it the bytes differ.
	raw := bytes.Clone(want)
	x86BCJDecode(raw, 0)
	if bytes.Equal(raw, want) {
		t.Fatal("x86BCJDecode changed nothing on x86-like data")
	}
}

// checkPVH refuses what is not an x86-64 ELF with the PVH note.
func TestCheckPVHRefuses(t *testing.T) {
	if err := checkPVH([]byte("not an elf")); err == nil {
		t.Fatal("accepted garbage")
	}
}
