package cas

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrInvalidResource is wrapped by every resource name parsing failure.
var ErrInvalidResource = errors.New("invalid resource name")

// Compression is the encoding of a blob on the wire.
type Compression int

const (
	// Identity is the uncompressed blob.
	Identity Compression = iota
	// Zstd is a zstd frame of the blob.
	Zstd
)

func (c Compression) String() string {
	if c == Zstd {
		return "zstd"
	}
	return "identity"
}

// digestFunctionNames are the lower-case DigestFunction values a resource
// name may carry as an extra path segment (only for functions whose hash
// length is ambiguous); this server supports none of them. The legacy names
// are listed too so that a client that sends one gets a clear answer. An
// explicit "sha256" segment (which REAPI says to omit) is tolerated.
var digestFunctionNames = map[string]bool{"blake3": true, "sha256tree": true, "sha1": true, "md5": true, "sha384": true, "sha512": true, "murmur3": true, "vso": true}

// reservedSegments may not appear in an instance name (REAPI: "a path
// segment cannot equal any of the following keywords").
var reservedSegments = map[string]bool{"blobs": true, "uploads": true, "actions": true, "actionResults": true, "operations": true, "capabilities": true, "compressed-blobs": true}

// Resource is a parsed ByteStream resource name.
type Resource struct {
	InstanceName string
	UploadID     string // writes only
	Compression  Compression
	Digest       Digest
}

// String formats r as a resource name: the upload form when UploadID is
// set, the read form otherwise. Parsing the result gives r back.
func (r Resource) String() string {
	var b strings.Builder
	if r.InstanceName != "" {
		b.WriteString(r.InstanceName)
		b.WriteByte('/')
	}
	if r.UploadID != "" {
		b.WriteString("uploads/")
		b.WriteString(r.UploadID)
		b.WriteByte('/')
	}
	if r.Compression == Zstd {
		b.WriteString("compressed-blobs/zstd/")
	} else {
		b.WriteString("blobs/")
	}
	b.WriteString(r.Digest.String())
	return b.String()
}

// ParseReadResource parses "{instance}/blobs/{hash}/{size}" or
// "{instance}/compressed-blobs/{compressor}/{hash}/{size}". Trailing
// segments are ignored.
func ParseReadResource(name string) (Resource, error) {
	return parseResource(name, false)
}

// ParseWriteResource parses "{instance}/uploads/{uuid}/blobs/{hash}/{size}[/...]"
// or the compressed-blobs form.
func ParseWriteResource(name string) (Resource, error) {
	return parseResource(name, true)
}

func parseResource(name string, write bool) (Resource, error) {
	want := `"[instance/]blobs/{hash}/{size}" or "[instance/]compressed-blobs/zstd/{hash}/{size}"`
	if write {
		want = `"[instance/]uploads/{uuid}/blobs/{hash}/{size}" or "[instance/]uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}"`
	}
	fail := func(format string, args ...any) (Resource, error) {
		return Resource{}, fmt.Errorf("%w: %q: %s; want %s", ErrInvalidResource, truncate(name), fmt.Sprintf(format, args...), want)
	}
	if name == "" {
		return fail("empty")
	}
	parts := strings.Split(name, "/")
	// The instance name ends at the first keyword: "uploads" for writes,
	// "blobs" or "compressed-blobs" for reads.
	i := 0
	for ; i < len(parts); i++ {
		p := parts[i]
		if write && p == "uploads" || !write && (p == "blobs" || p == "compressed-blobs") {
			break
		}
		if reservedSegments[p] {
			return fail("instance name segment %q is a reserved keyword", p)
		}
		if p == "" {
			return fail("empty path segment")
		}
	}
	if i == len(parts) {
		if write {
			return fail(`no "uploads" segment`)
		}
		return fail(`no "blobs" or "compressed-blobs" segment`)
	}
	r := Resource{InstanceName: strings.Join(parts[:i], "/")}
	j := i
	if write {
		if j+1 >= len(parts) || parts[j+1] == "" {
			return fail(`no upload id after "uploads"`)
		}
		r.UploadID = parts[j+1]
		j += 2
		if j >= len(parts) {
			return fail("nothing after the upload id")
		}
	}
	switch parts[j] {
	case "blobs":
		j++
	case "compressed-blobs":
		if j+1 >= len(parts) {
			return fail("no compressor after \"compressed-blobs\"")
		}
		switch parts[j+1] {
		case "zstd":
			r.Compression = Zstd
		case "identity":
			r.Compression = Identity
		default:
			return fail("compressor %q is not supported (supported: zstd, identity)", truncate(parts[j+1]))
		}
		j += 2
	default:
		return fail(`expected "blobs" or "compressed-blobs" after the upload id, got %q`, truncate(parts[j]))
	}
	if j < len(parts) && parts[j] == "sha256" {
		j++
	} else if j < len(parts) && digestFunctionNames[parts[j]] {
		return fail("digest function %q is not supported; this server only supports sha256", parts[j])
	}
	if j+2 > len(parts) {
		return fail("missing {hash}/{size}")
	}
	size, ok := parseSize(parts[j+1])
	if !ok {
		return fail("size %q is not a non-negative decimal integer", truncate(parts[j+1]))
	}
	d, err := NewDigest(parts[j], size)
	if err != nil {
		return Resource{}, fmt.Errorf("%w: %q: %w", ErrInvalidResource, truncate(name), err)
	}
	r.Digest = d
	return r, nil
}

// parseSize accepts canonical decimal integers only: no sign, no leading
// zeros, no overflow.
func parseSize(s string) (int64, bool) {
	if s == "" || len(s) > 1 && s[0] == '0' {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}
