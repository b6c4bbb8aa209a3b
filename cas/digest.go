// Package cas is actiond's content-addressable storage: digests, the Store
// interface the rest of actiond consumes, a crash-safe disk implementation
// with LRU eviction, and the REAPI ContentAddressableStorage and ByteStream
// gRPC services on top of any Store.
package cas

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// Digest identifies a blob by its SHA-256 hash (lower-case hex) and size.
type Digest struct {
	Hash string
	Size int64
}

// EmptyDigest is the digest of the empty blob, which every Store holds.
var EmptyDigest = Digest{Hash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", Size: 0}

// ErrInvalidDigest is wrapped by every digest validation failure.
var ErrInvalidDigest = errors.New("invalid digest")

// notLowerHex is 1 for every byte that is not 0-9 or a-f.
var notLowerHex = func() (t [256]byte) {
	for i := range t {
		if !(i >= '0' && i <= '9' || i >= 'a' && i <= 'f') {
			t[i] = 1
		}
	}
	return t
}()

// NewDigest validates a hash and size.
func NewDigest(hash string, size int64) (Digest, error) {
	if len(hash) != sha256.Size*2 {
		return Digest{}, fmt.Errorf("%w: hash %q is %d characters long, want %d hex characters (SHA-256)", ErrInvalidDigest, truncate(hash), len(hash), sha256.Size*2)
	}
	// One table lookup per character: FindMissingBlobs validates 10,000
	// digests per call.
	var bad byte
	for i := 0; i < len(hash); i++ {
		bad |= notLowerHex[hash[i]]
	}
	if bad != 0 {
		for i := 0; i < len(hash); i++ {
			if c := hash[i]; notLowerHex[c] != 0 {
				return Digest{}, fmt.Errorf("%w: hash %q has %q at position %d; want lower-case hex", ErrInvalidDigest, hash, c, i)
			}
		}
	}
	if size < 0 {
		return Digest{}, fmt.Errorf("%w: size %d is negative", ErrInvalidDigest, size)
	}
	return Digest{Hash: hash, Size: size}, nil
}

// Validate checks a Digest built without NewDigest (a struct literal).
func (d Digest) Validate() error {
	_, err := NewDigest(d.Hash, d.Size)
	return err
}

// ValidateRead checks the arguments of Store.Get: a valid digest and an
// offset within the blob (at its end reads nothing).
func ValidateRead(d Digest, offset int64) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if offset < 0 || offset > d.Size {
		return fmt.Errorf("read %s at offset %d: offset out of range", d, offset)
	}
	return nil
}

// FromProto validates a REAPI digest. A nil digest is invalid.
func FromProto(d *repb.Digest) (Digest, error) {
	if d == nil {
		return Digest{}, fmt.Errorf("%w: digest is missing", ErrInvalidDigest)
	}
	return NewDigest(d.Hash, d.SizeBytes)
}

// Proto converts to the REAPI message.
func (d Digest) Proto() *repb.Digest { return &repb.Digest{Hash: d.Hash, SizeBytes: d.Size} }

// String is "hash/size", the form used in resource names and logs.
func (d Digest) String() string { return d.Hash + "/" + strconv.FormatInt(d.Size, 10) }

// IsEmpty reports whether d is the empty blob.
func (d Digest) IsEmpty() bool { return d == EmptyDigest }

// DigestOf hashes b.
func DigestOf(b []byte) Digest {
	sum := sha256.Sum256(b)
	return Digest{Hash: hex.EncodeToString(sum[:]), Size: int64(len(b))}
}

// DigestReader hashes everything r yields.
func DigestReader(r io.Reader) (Digest, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return Digest{}, err
	}
	return Digest{Hash: hex.EncodeToString(h.Sum(nil)), Size: n}, nil
}

// DigestFile hashes the file at path.
func DigestFile(path string) (Digest, error) {
	f, err := os.Open(path)
	if err != nil {
		return Digest{}, err
	}
	defer f.Close()
	return DigestReader(f)
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}
