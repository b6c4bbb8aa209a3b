package cas

import (
	"errors"
	"strings"
	"testing"
)

func TestParseReadResource(t *testing.T) {
	h := helloHash
	tests := []struct {
		name string
		in   string
		want Resource // zero: an error is expected
	}{
		{"plain", "blobs/" + h + "/5", Resource{Digest: Digest{h, 5}}},
		{"instance", "main/blobs/" + h + "/5", Resource{InstanceName: "main", Digest: Digest{h, 5}}},
		{"deep instance", "a/b/c/blobs/" + h + "/5", Resource{InstanceName: "a/b/c", Digest: Digest{h, 5}}},
		{"zstd", "compressed-blobs/zstd/" + h + "/5", Resource{Compression: Zstd, Digest: Digest{h, 5}}},
		{"identity compressor", "i/compressed-blobs/identity/" + h + "/5", Resource{InstanceName: "i", Digest: Digest{h, 5}}},
		{"explicit sha256", "blobs/sha256/" + h + "/5", Resource{Digest: Digest{h, 5}}},
		{"trailing metadata", "blobs/" + h + "/5/extra/stuff", Resource{Digest: Digest{h, 5}}},
		{"empty blob", "blobs/" + EmptyDigest.Hash + "/0", Resource{Digest: EmptyDigest}},
		{"max size", "blobs/" + h + "/9223372036854775807", Resource{Digest: Digest{h, 1<<63 - 1}}},

		{"empty", "", Resource{}},
		{"no blobs", h + "/5", Resource{}},
		{"only blobs", "blobs", Resource{}},
		{"no size", "blobs/" + h, Resource{}},
		{"empty size", "blobs/" + h + "/", Resource{}},
		{"negative size", "blobs/" + h + "/-5", Resource{}},
		{"minus zero", "blobs/" + h + "/-0", Resource{}},
		{"plus sign", "blobs/" + h + "/+5", Resource{}},
		{"leading zero", "blobs/" + h + "/05", Resource{}},
		{"hex size", "blobs/" + h + "/0x5", Resource{}},
		{"size overflow", "blobs/" + h + "/9223372036854775808", Resource{}},
		{"size with space", "blobs/" + h + "/5 ", Resource{}},
		{"short hash", "blobs/" + h[:63] + "/5", Resource{}},
		{"long hash", "blobs/" + h + "0/5", Resource{}},
		{"upper hash", "blobs/" + strings.ToUpper(h) + "/5", Resource{}},
		{"non-hex hash", "blobs/" + strings.Repeat("z", 64) + "/5", Resource{}},
		{"blake3", "blobs/blake3/" + h + "/5", Resource{}},
		{"sha1", "blobs/sha1/" + strings.Repeat("a", 40) + "/5", Resource{}},
		{"unknown compressor", "compressed-blobs/brotli/" + h + "/5", Resource{}},
		{"no compressor", "compressed-blobs", Resource{}},
		{"upload name", "uploads/u/blobs/" + h + "/5", Resource{}},
		{"reserved instance", "actions/blobs/" + h + "/5", Resource{}},
		{"empty instance segment", "a//blobs/" + h + "/5", Resource{}},
		{"leading slash", "/blobs/" + h + "/5", Resource{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseReadResource(tc.in)
			if tc.want == (Resource{}) {
				if err == nil {
					t.Fatalf("ParseReadResource(%q) = %+v; want an error", tc.in, got)
				}
				if !errors.Is(err, ErrInvalidResource) {
					t.Fatalf("error %v does not wrap ErrInvalidResource", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseReadResource(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestParseWriteResource(t *testing.T) {
	h := helloHash
	const uuid = "3e4a3f8c-6d2a-4bd1-9a57-5f4b3b1c8f0e"
	tests := []struct {
		name string
		in   string
		want Resource
	}{
		{"plain", "uploads/" + uuid + "/blobs/" + h + "/5", Resource{UploadID: uuid, Digest: Digest{h, 5}}},
		{"instance", "x/y/uploads/" + uuid + "/blobs/" + h + "/5", Resource{InstanceName: "x/y", UploadID: uuid, Digest: Digest{h, 5}}},
		{"metadata", "uploads/" + uuid + "/blobs/" + h + "/5/meta/data", Resource{UploadID: uuid, Digest: Digest{h, 5}}},
		{"zstd", "uploads/" + uuid + "/compressed-blobs/zstd/" + h + "/5", Resource{UploadID: uuid, Compression: Zstd, Digest: Digest{h, 5}}},

		{"read name", "blobs/" + h + "/5", Resource{}},
		{"no uuid", "uploads/", Resource{}},
		{"only uploads", "uploads", Resource{}},
		{"nothing after uuid", "uploads/" + uuid, Resource{}},
		{"wrong keyword", "uploads/" + uuid + "/blob/" + h + "/5", Resource{}},
		{"missing size", "uploads/" + uuid + "/blobs/" + h, Resource{}},
		{"bad hash", "uploads/" + uuid + "/blobs/xyz/5", Resource{}},
		{"negative", "uploads/" + uuid + "/blobs/" + h + "/-1", Resource{}},
		{"blake3", "uploads/" + uuid + "/blobs/blake3/" + h + "/5", Resource{}},
		{"unknown compressor", "uploads/" + uuid + "/compressed-blobs/lz4/" + h + "/5", Resource{}},
		{"reserved instance", "blobs/uploads/" + uuid + "/blobs/" + h + "/5", Resource{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseWriteResource(tc.in)
			if tc.want == (Resource{}) {
				if err == nil || !errors.Is(err, ErrInvalidResource) {
					t.Fatalf("ParseWriteResource(%q) = %+v, %v; want an ErrInvalidResource", tc.in, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseWriteResource(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestResourceErrorsAreReadable(t *testing.T) {
	_, err := ParseReadResource("blobs/" + helloHash + "/-5")
	if err == nil || !strings.Contains(err.Error(), `size "-5"`) {
		t.Errorf("error %v does not name the bad size", err)
	}
	_, err = ParseReadResource("blobs/blake3/" + helloHash + "/5")
	if err == nil || !strings.Contains(err.Error(), "blake3") {
		t.Errorf("error %v does not name the digest function", err)
	}
	long := strings.Repeat("x/", 10000)
	_, err = ParseReadResource(long)
	if err == nil || len(err.Error()) > 1000 {
		t.Errorf("error for a huge name is %d bytes long", len(err.Error()))
	}
}

// FuzzParseResource checks that parsing never panics, that every error
// wraps ErrInvalidResource, and that whatever parses formats back to a
// name that parses to the same Resource.
func FuzzParseResource(f *testing.F) {
	h := helloHash
	for _, s := range []string{
		"blobs/" + h + "/5",
		"inst/compressed-blobs/zstd/" + h + "/5",
		"uploads/u/blobs/" + h + "/5/meta",
		"a/b/uploads/u/compressed-blobs/zstd/sha256/" + h + "/0",
		"blobs/" + h + "/-0",
		"uploads//blobs/" + h + "/5",
		"",
		"/",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		for _, write := range []bool{false, true} {
			r, err := parseResource(name, write)
			if err != nil {
				if !errors.Is(err, ErrInvalidResource) {
					t.Fatalf("error %v does not wrap ErrInvalidResource", err)
				}
				continue
			}
			if err := r.Digest.Validate(); err != nil {
				t.Fatalf("parsed an invalid digest %v from %q", r.Digest, name)
			}
			if write != (r.UploadID != "") {
				t.Fatalf("upload id %q for write=%v", r.UploadID, write)
			}
			back, err := parseResource(r.String(), write)
			if err != nil || back != r {
				t.Fatalf("%q parsed to %+v, formatted to %q, which parsed to %+v, %v", name, r, r.String(), back, err)
			}
			if !strings.Contains(name, r.Digest.Hash) {
				t.Fatalf("hash %q not in %q", r.Digest.Hash, name)
			}
		}
	})
}
