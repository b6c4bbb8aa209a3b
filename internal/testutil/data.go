package testutil

// Data returns n pseudo-random bytes determined by seed (xorshift: fast,
// and the same bytes on every run and machine).
func Data(seed, n int) []byte {
	b := make([]byte, n)
	x := uint64(seed)*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}
