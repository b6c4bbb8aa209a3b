package debian

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/clearsign"
	pgperrors "github.com/ProtonMail/go-crypto/openpgp/errors"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
)

// Release is a suite's verified InRelease.
type Release struct {
	Suite, Codename, Version string
	Date                     time.Time
	// Signer describes the key whose signature was checked.
	Signer string
	// Files maps a path relative to dists/<suite>/ to its size and SHA-256.
	Files map[string]FileHash
}

// FileHash is what an index says a file must be.
type FileHash struct {
	Size   int64
	SHA256 string
}

// VerifyInRelease checks the clearsigned InRelease data against keyring
// and parses the signed text. name is used in errors (e.g. the URL).
func VerifyInRelease(name string, data []byte, keyring openpgp.EntityList) (*Release, error) {
	block, rest := clearsign.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s: not a clearsigned OpenPGP message", name)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%s: data after the signature", name)
	}
	// The archive signs with several keys (the automatic key of this and
	// the previous release, the release's stable key): one good
	// signature from a known key is what apt requires too.
	cfg := &packet.Config{}
	signer, err := block.VerifySignature(keyring, cfg)
	if err != nil {
		if errors.Is(err, pgperrors.ErrUnknownIssuer) {
			return nil, fmt.Errorf("%s: signed by no key Debian's archive keyring knows: %w", name, err)
		}
		return nil, fmt.Errorf("%s: bad OpenPGP signature (tampered or corrupted file): %w", name, err)
	}
	paras, err := ParseParagraphs(block.Plaintext)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(paras) != 1 {
		return nil, fmt.Errorf("%s: want one paragraph, got %d", name, len(paras))
	}
	p := paras[0]
	r := &Release{Suite: p.Get("Suite"), Codename: p.Get("Codename"), Version: p.Get("Version"), Files: map[string]FileHash{}}
	for _, id := range signer.Identities {
		r.Signer = id.Name
		break
	}
	if r.Signer == "" {
		r.Signer = fmt.Sprintf("%X", signer.PrimaryKey.Fingerprint)
	}
	if d := p.Get("Date"); d != "" {
		if t, err := time.Parse(time.RFC1123, strings.Replace(d, "UTC", "GMT", 1)); err == nil {
			r.Date = t
		} else if t, err := time.Parse("Mon, 2 Jan 2006 15:04:05 MST", d); err == nil {
			r.Date = t
		}
	}
	for _, l := range strings.Split(p.Get("SHA256"), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 {
			continue
		}
		size, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: SHA256 line %q: %w", name, l, err)
		}
		r.Files[f[2]] = FileHash{Size: size, SHA256: strings.ToLower(f[0])}
	}
	if len(r.Files) == 0 {
		return nil, fmt.Errorf("%s: no SHA256 file list", name)
	}
	return r, nil
}
