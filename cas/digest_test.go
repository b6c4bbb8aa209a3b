package cas

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

const (
	helloHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" // "hello"
)

func TestNewDigest(t *testing.T) {
	tests := []struct {
		name string
		hash string
		size int64
		ok   bool
	}{
		{"valid", helloHash, 5, true},
		{"empty blob", EmptyDigest.Hash, 0, true},
		{"size not checked against content", helloHash, 1 << 40, true},
		{"empty hash", "", 5, false},
		{"short", helloHash[:63], 5, false},
		{"long", helloHash + "0", 5, false},
		{"sha1 length", strings.Repeat("a", 40), 5, false},
		{"upper case", strings.ToUpper(helloHash), 5, false},
		{"non hex", "g" + helloHash[1:], 5, false},
		{"slash", "/" + helloHash[1:], 5, false},
		{"space", " " + helloHash[1:], 5, false},
		{"unicode", "é" + helloHash[2:], 5, false},
		{"negative size", helloHash, -1, false},
		{"min int64", helloHash, -1 << 63, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := NewDigest(tc.hash, tc.size)
			if tc.ok != (err == nil) {
				t.Fatalf("NewDigest(%q, %d) = %v, %v; want ok=%v", tc.hash, tc.size, d, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidDigest) {
				t.Errorf("error %v does not wrap ErrInvalidDigest", err)
			}
			if err == nil && (d.Hash != tc.hash || d.Size != tc.size || d.Validate() != nil) {
				t.Errorf("NewDigest = %v", d)
			}
			pd, perr := FromProto(&repb.Digest{Hash: tc.hash, SizeBytes: tc.size})
			if (perr == nil) != (err == nil) || pd != d {
				t.Errorf("FromProto disagrees: %v, %v", pd, perr)
			}
		})
	}
	if _, err := FromProto(nil); !errors.Is(err, ErrInvalidDigest) {
		t.Errorf("FromProto(nil) = %v", err)
	}
}

func TestDigestHelpers(t *testing.T) {
	d := DigestOf([]byte("hello"))
	if d.Hash != helloHash || d.Size != 5 {
		t.Fatalf("DigestOf(hello) = %v", d)
	}
	if got, err := DigestReader(bytes.NewReader([]byte("hello"))); err != nil || got != d {
		t.Fatalf("DigestReader = %v, %v", got, err)
	}
	if DigestOf(nil) != EmptyDigest || !EmptyDigest.IsEmpty() || d.IsEmpty() {
		t.Fatal("empty digest")
	}
	if d.String() != helloHash+"/5" {
		t.Fatalf("String = %q", d.String())
	}
	if p := d.Proto(); p.Hash != d.Hash || p.SizeBytes != 5 {
		t.Fatalf("Proto = %v", p)
	}
	// A size-0 digest that is not the empty hash is not the empty blob.
	if (Digest{Hash: helloHash, Size: 0}).IsEmpty() {
		t.Fatal("IsEmpty with non-empty hash")
	}
	if (Digest{Hash: "ab", Size: 1}).Validate() == nil {
		t.Fatal("Validate accepted a short hash")
	}
}

// FuzzParseDigest checks that digest validation never panics, accepts
// exactly 64 lower-case hex characters with a non-negative size, and that
// accepted digests survive the trip through the proto and resource forms.
func FuzzParseDigest(f *testing.F) {
	f.Add(helloHash, int64(5))
	f.Add(EmptyDigest.Hash, int64(0))
	f.Add(strings.ToUpper(helloHash), int64(5))
	f.Add("", int64(-1))
	f.Add(helloHash[:63]+"\x00", int64(1<<62))
	f.Fuzz(func(t *testing.T, hash string, size int64) {
		d, err := NewDigest(hash, size)
		valid := len(hash) == 64 && size >= 0
		for i := 0; valid && i < len(hash); i++ {
			c := hash[i]
			valid = c >= '0' && c <= '9' || c >= 'a' && c <= 'f'
		}
		if valid != (err == nil) {
			t.Fatalf("NewDigest(%q, %d) error %v; want valid=%v", hash, size, err, valid)
		}
		if err != nil {
			if !errors.Is(err, ErrInvalidDigest) {
				t.Fatalf("error %v does not wrap ErrInvalidDigest", err)
			}
			return
		}
		if back, err := FromProto(d.Proto()); err != nil || back != d {
			t.Fatalf("proto round trip: %v, %v", back, err)
		}
		for _, r := range []Resource{{Digest: d}, {InstanceName: "a/b", UploadID: "u", Compression: Zstd, Digest: d}} {
			parse := ParseReadResource
			if r.UploadID != "" {
				parse = ParseWriteResource
			}
			if back, err := parse(r.String()); err != nil || back != r {
				t.Fatalf("resource round trip of %q: %v, %v", r.String(), back, err)
			}
		}
	})
}
