package debian

import (
	"bytes"
	_ "embed"
	"fmt"
	"sync"

	"github.com/ProtonMail/go-crypto/openpgp"
)

// archiveKeys are Debian's archive signing keys for bullseye, bookworm and
// trixie (stable release, automatic and security-automatic keys), exported
// from the debian-archive-keyring package's
// /usr/share/keyrings/debian-archive-*.gpg. A new Debian release adds a
// key: append its .gpg file here.
//
//go:embed debian-archive-keys.gpg
var archiveKeys []byte

var (
	keyringOnce sync.Once
	keyring     openpgp.EntityList
	keyringErr  error
)

// ArchiveKeyring returns Debian's archive keys carried by actiond.
func ArchiveKeyring() (openpgp.EntityList, error) {
	keyringOnce.Do(func() {
		keyring, keyringErr = ReadKeyring(archiveKeys)
	})
	return keyring, keyringErr
}

// ReadKeyring reads binary OpenPGP keys (the format of /usr/share/keyrings).
func ReadKeyring(data []byte) (openpgp.EntityList, error) {
	var all openpgp.EntityList
	r := bytes.NewReader(data)
	for r.Len() > 0 {
		el, err := openpgp.ReadKeyRing(r)
		if err != nil {
			return nil, fmt.Errorf("read keyring: %w", err)
		}
		all = append(all, el...)
	}
	if len(all) == 0 {
		return nil, fmt.Errorf("read keyring: no keys")
	}
	return all, nil
}
