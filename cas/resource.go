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
// name may carry as an extra path segment; this server supports none of them.
var digestFunctionNames = map[string]bool{"blake3": true, "sha256tree": true, "sha1": true, "md5": true, "sha384": true, "sha512": true, "murmur3": true, "vso": true}

// Resource is a parsed ByteStream resource name.
type Resource struct {
	InstanceName string
	UploadID     string // writes only
	Compression  Compression
	Digest       Digest
}

// ParseReadResource parses "{instance}/blobs/{hash}/{size}[/...]" or
// "{instance}/compressed-blobs/{compressor}/{hash}/{size}[/...]".
func ParseReadResource(name string) (Resource, error) {
	return parseResource(name, false)
}

// ParseWriteResource parses "{instance}/uploads/{uuid}/blobs/{hash}/{size}[/...]"
// or the compressed-blobs form.
func ParseWriteResource(name string) (Resource, error) {
	return parseResource(name, true)
}

func parseResource(name string, write bool) (Resource, error) {
	if name == "" {
		return Resource{}, fmt.Errorf("%w: empty", ErrInvalidResource)
	}
	parts := strings.Split(name, "/")
	want := `"[instance/]blobs/{hash}/{size}" or "[instance/]compressed-blobs/zstd/{hash}/{size}"`
	if write {
		want = `"[instance/]uploads/{uuid}/blobs/{hash}/{size}" or "[instance/]uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}"`
	}
	// Find the first "blobs" or "compressed-blobs" segment (after "uploads/{uuid}" for writes).
	for i := 0; i < len(parts); i++ {
		var r Resource
		j := i
		if write {
			if parts[j] != "uploads" {
				continue
			}
			if j+1 >= len(parts) || parts[j+1] == "" {
				return Resource{}, fmt.Errorf("%w: %q has no upload id after \"uploads\"; want %s", ErrInvalidResource, truncate(name), want)
			}
			r.UploadID = parts[j+1]
			j += 2
			if j >= len(parts) {
				break
			}
		}
		switch parts[j] {
		case "blobs":
			j++
		case "compressed-blobs":
			if j+1 >= len(parts) {
				return Resource{}, fmt.Errorf("%w: %q has no compressor; want %s", ErrInvalidResource, truncate(name), want)
			}
			switch parts[j+1] {
			case "zstd":
				r.Compression = Zstd
			case "identity":
				r.Compression = Identity
			default:
				return Resource{}, fmt.Errorf("%w: compressor %q is not supported (supported: zstd, identity)", ErrInvalidResource, parts[j+1])
			}
			j += 2
		default:
			if write {
				return Resource{}, fmt.Errorf("%w: %q: expected \"blobs\" or \"compressed-blobs\" after the upload id; want %s", ErrInvalidResource, truncate(name), want)
			}
			continue
		}
		if j < len(parts) && digestFunctionNames[parts[j]] {
			return Resource{}, fmt.Errorf("%w: %q: digest function %q is not supported; this server only supports sha256", ErrInvalidResource, truncate(name), parts[j])
		}
		if j+2 > len(parts) {
			return Resource{}, fmt.Errorf("%w: %q is missing {hash}/{size}; want %s", ErrInvalidResource, truncate(name), want)
		}
		size, err := strconv.ParseInt(parts[j+1], 10, 64)
		if err != nil || (parts[j+1] != "0" && parts[j+1][0] == '0') {
			return Resource{}, fmt.Errorf("%w: %q: size %q is not a non-negative decimal integer", ErrInvalidResource, truncate(name), truncate(parts[j+1]))
		}
		d, err := NewDigest(parts[j], size)
		if err != nil {
			return Resource{}, fmt.Errorf("%w: %q: %w", ErrInvalidResource, truncate(name), err)
		}
		r.Digest = d
		r.InstanceName = strings.Join(parts[:i], "/")
		return r, nil
	}
	return Resource{}, fmt.Errorf("%w: %q; want %s", ErrInvalidResource, truncate(name), want)
}
