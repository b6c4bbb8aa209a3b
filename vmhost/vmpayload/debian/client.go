package debian

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ulikunitz/xz"
)

// DefaultMirror is Debian's own archive (a CDN).
const DefaultMirror = "http://deb.debian.org/debian"

// MirrorEnv names the environment variable that overrides DefaultMirror.
const MirrorEnv = "ACTIOND_DEBIAN_MIRROR"

// MirrorFromEnv returns $ACTIOND_DEBIAN_MIRROR, else DefaultMirror.
func MirrorFromEnv() string {
	if m := os.Getenv(MirrorEnv); m != "" {
		return m
	}
	return DefaultMirror
}

// Client reads one Debian mirror and caches what it verified under Dir:
//
//	Dir/dists/<suite>/InRelease                      verified signature
//	Dir/dists/<suite>/main/binary-<arch>/Packages.xz checked against InRelease
//	Dir/debs/<name>_<version>_<arch>.deb             checked against Packages
type Client struct {
	Mirror  string // e.g. http://deb.debian.org/debian
	Dir     string // cache directory
	HTTP    *http.Client
	Keyring openpgp.EntityList // default: ArchiveKeyring()
	// Offline uses only the cache: indexes are not refreshed and a missing
	// file is an error instead of a download.
	Offline bool
	// Progress, if set, gets human-readable progress lines.
	Progress func(format string, args ...any)
	// Downloaded counts the bytes fetched from the network.
	Downloaded int64
}

func (c *Client) progress(format string, args ...any) {
	if c.Progress != nil {
		c.Progress(format, args...)
	}
}

func (c *Client) mirror() string { return strings.TrimRight(c.Mirror, "/") }

func (c *Client) httpClient() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	return http.DefaultClient
}

// Archive is a suite's verified index for one architecture.
type Archive struct {
	Suite   string
	Arch    string
	Release *Release
	Index   *Index
}

// Open returns the verified index of suite for arch (component main).
// With refresh, InRelease is fetched again; otherwise a cached,
// previously verified one is used when present (and verified again).
func (c *Client) Open(ctx context.Context, suite, arch string, refresh bool) (*Archive, error) {
	keyring := c.Keyring
	if keyring == nil {
		var err error
		if keyring, err = ArchiveKeyring(); err != nil {
			return nil, err
		}
	}
	distDir := filepath.Join(c.Dir, "dists", suite)
	relPath := filepath.Join(distDir, "InRelease")
	relURL := c.mirror() + "/dists/" + suite + "/InRelease"
	var rel *Release
	if data, err := os.ReadFile(relPath); err == nil && (!refresh || c.Offline) {
		if rel, err = VerifyInRelease(relPath, data, keyring); err != nil {
			// A cache file that no longer verifies is dropped, not used.
			os.Remove(relPath)
			rel = nil
		}
	}
	if rel == nil {
		if c.Offline {
			return nil, fmt.Errorf("%s: not cached, and offline", relPath)
		}
		data, err := c.get(ctx, relURL, 16<<20)
		if err != nil {
			return nil, err
		}
		if rel, err = VerifyInRelease(relURL, data, keyring); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(distDir, 0o755); err != nil {
			return nil, err
		}
		if err := writeFileAtomic(relPath, data); err != nil {
			return nil, err
		}
		c.progress("%s: verified, signed by %s (%s, %s)", relURL, rel.Signer, rel.Codename, rel.Date.Format("2006-01-02"))
	}
	name := "main/binary-" + arch + "/Packages.xz"
	want, ok := rel.Files[name]
	if !ok {
		return nil, fmt.Errorf("%s lists no %s (is %s an architecture of %s?)", relURL, name, arch, suite)
	}
	// The decompressed index is kept too (checked by its own SHA-256 in
	// InRelease): Go's xz decoder is slow, parsing it again is not.
	plainName := strings.TrimSuffix(name, ".xz")
	plainWant, ok := rel.Files[plainName]
	if !ok {
		return nil, fmt.Errorf("%s lists no %s", relURL, plainName)
	}
	plainPath := filepath.Join(distDir, filepath.FromSlash(plainName))
	if ok, _ := fileMatches(plainPath, plainWant); !ok {
		xzPath := plainPath + ".xz"
		if err := c.fetchVerified(ctx, c.mirror()+"/dists/"+suite+"/"+name, xzPath, want, relURL); err != nil {
			return nil, err
		}
		if err := unxzVerified(xzPath, plainPath, plainWant, relURL); err != nil {
			return nil, err
		}
	}
	data, err := os.ReadFile(plainPath)
	if err != nil {
		return nil, err
	}
	idx, err := ParseIndex(data, arch)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", plainPath, err)
	}
	return &Archive{Suite: suite, Arch: arch, Release: rel, Index: idx}, nil
}

// unxzVerified decompresses src into dst (through a temporary file) and
// checks the result's hash.
func unxzVerified(src, dst string, want FileHash, index string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := xz.NewReader(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	tmp := dst + ".tmp"
	out, err := os.Create(tmp)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), zr)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("decompress %s: %w", src, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want.SHA256 || n != want.Size {
		os.Remove(tmp)
		os.Remove(src)
		return &HashMismatchError{File: src + " (decompressed)", Index: index, WantSHA256: want.SHA256, GotSHA256: got, WantSize: want.Size, GotSize: n}
	}
	return os.Rename(tmp, dst)
}

// Download makes sure the .deb of p is in the cache with the SHA-256 the
// index gives and returns its path.
func (c *Client) Download(ctx context.Context, p *Package) (string, error) {
	path := filepath.Join(c.Dir, "debs", p.DebName())
	err := c.fetchVerified(ctx, c.mirror()+"/"+p.Filename, path, FileHash{Size: p.Size, SHA256: p.SHA256}, "Packages")
	return path, err
}

// HashMismatchError reports a downloaded file that is not what the index
// says.
type HashMismatchError struct {
	File, Index           string
	WantSHA256, GotSHA256 string
	WantSize, GotSize     int64
}

func (e *HashMismatchError) Error() string {
	if e.WantSize != e.GotSize {
		return fmt.Sprintf("%s: size %d, but %s says %d (SHA-256 %s, want %s); not cached", e.File, e.GotSize, e.Index, e.WantSize, e.GotSHA256, e.WantSHA256)
	}
	return fmt.Sprintf("%s: SHA-256 %s, but %s says %s; not cached", e.File, e.GotSHA256, e.Index, e.WantSHA256)
}

// fetchVerified makes path hold url's content with the wanted hash. A
// cached file is rehashed; a download goes to path.part (resumed with a
// Range request when a previous one was interrupted) and is renamed into
// place only once its hash matched.
func (c *Client) fetchVerified(ctx context.Context, url, path string, want FileHash, index string) error {
	if ok, _ := fileMatches(path, want); ok {
		return nil
	}
	if c.Offline {
		return fmt.Errorf("%s: not cached (or changed), and offline", path)
	}
	os.Remove(path)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	part := path + ".part"
	for attempt := 0; ; attempt++ {
		err := c.download(ctx, url, part, want.Size)
		if err == nil {
			break
		}
		if ctx.Err() != nil || attempt >= 2 || errors.Is(err, errPermanent) {
			return err
		}
		c.progress("%s: %v; retrying", url, err)
		time.Sleep(time.Duration(attempt+1) * time.Second)
	}
	sum, size, err := fileSHA256(part)
	if err != nil {
		return err
	}
	if sum != want.SHA256 || size != want.Size {
		os.Remove(part)
		return &HashMismatchError{File: url, Index: index, WantSHA256: want.SHA256, GotSHA256: sum, WantSize: want.Size, GotSize: size}
	}
	return os.Rename(part, path)
}

var errPermanent = errors.New("permanent")

// download appends url's content to part from where a previous attempt
// stopped.
func (c *Client) download(ctx context.Context, url, part string, size int64) error {
	f, err := os.OpenFile(part, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	have, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	if have > size {
		if err := f.Truncate(0); err != nil {
			return err
		}
		have, _ = f.Seek(0, io.SeekStart)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if have > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", have))
	}
	resp, err := c.httpClient().Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusPartialContent && have > 0:
	case resp.StatusCode == http.StatusOK:
		if err := f.Truncate(0); err != nil {
			return err
		}
		if have, err = f.Seek(0, io.SeekStart); err != nil {
			return err
		}
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable:
		f.Truncate(0)
		return fmt.Errorf("GET %s: %s (restarting)", url, resp.Status)
	default:
		return fmt.Errorf("GET %s: %s: %w", url, resp.Status, errPermanent)
	}
	if have == 0 {
		c.progress("downloading %s (%s)", url, mib(size))
	} else {
		c.progress("resuming %s at %s of %s", url, mib(have), mib(size))
	}
	pw := &progressWriter{w: f, done: have, total: size, url: url, c: c, last: time.Now()}
	n, err := io.Copy(pw, io.LimitReader(resp.Body, size-have+1))
	c.Downloaded += n
	if err != nil {
		return fmt.Errorf("GET %s: after %s of %s: %w", url, mib(have+n), mib(size), err)
	}
	return f.Close()
}

// get fetches a small file into memory.
func (c *Client) get(ctx context.Context, url string, limit int64) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.httpClient().Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	c.Downloaded += int64(len(data))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("GET %s: larger than %s", url, mib(limit))
	}
	return data, nil
}

func fileMatches(path string, want FileHash) (bool, error) {
	st, err := os.Stat(path)
	if err != nil || st.Size() != want.Size {
		return false, err
	}
	sum, _, err := fileSHA256(path)
	return err == nil && sum == want.SHA256, err
}

func fileSHA256(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// writeFileAtomic writes data to path through a temporary file.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// progressWriter reports a long download's bytes done every few seconds.
type progressWriter struct {
	w           io.Writer
	done, total int64
	url         string
	c           *Client
	last        time.Time
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	if time.Since(p.last) >= 5*time.Second {
		p.last = time.Now()
		p.c.progress("%s: %s of %s", p.url, mib(p.done), mib(p.total))
	}
	return n, err
}
