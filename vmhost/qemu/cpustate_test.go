package qemu

import "testing"

func TestSummarizeRegisters(t *testing.T) {
	// Abridged from a TCG guest caught looping on an int3 (x86) and from
	// an arm64 guest.
	x86 := `CPU#0
RAX=ffffc900004cf558 RBX=0000000000000000 RCX=ffffffff81c01220 RDX=0000000000000000
RIP=ffffffff81a39d70 RFL=00000083 [--S---C] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0000 0000000000000000 00000000 00000000
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80
CPU#1
RAX=ffffea0000209f40 RBX=0000000000140dca RCX=0000000000000001 RDX=0000000000000000
RIP=ffffffff812f67b8 RFL=00000282 [--S----] CPL=0 II=0 A20=1 SMM=0 HLT=1
`
	arm64 := `CPU#0
 PC=ffff800008a1c2d4  X00=0000000000000000 X01=0000000000000000
PSTATE=604000c5 -ZC- EL1h
CPU#1
 PC=ffff800008012f40  X00=0000000000000001 X01=0000000000000000
`
	for _, tc := range []struct{ in, want string }{
		{x86, "cpu0 RIP=ffffffff81a39d70 CPL=0 HLT=0; cpu1 RIP=ffffffff812f67b8 CPL=0 HLT=1"},
		{arm64, "cpu0 PC=ffff800008a1c2d4; cpu1 PC=ffff800008012f40"},
		{"", ""},
		{"unexpected output\n", ""},
	} {
		if got := summarizeRegisters(tc.in); got != tc.want {
			t.Errorf("summarizeRegisters:\n got %q\nwant %q", got, tc.want)
		}
	}
}
