package cas

// SetVerifyReads turns the hashing of reads off (false) or back on, so a
// benchmark can compare verified reads with what reads cost before them.
// Tests only: production reads are always verified.
func SetVerifyReads(s *DiskStore, on bool) {
	s.unverifiedReads.Store(!on)
}

// SetInlineHash makes verified reads hash on the reading goroutine even
// for large blobs, to compare with the pipelined hasher.
func SetInlineHash(s *DiskStore, on bool) { s.inlineHash.Store(on) }
