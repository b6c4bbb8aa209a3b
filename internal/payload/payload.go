// Package payload is the guest payload (kernel, initramfs, runtimes disk)
// embedded in a standalone actiond binary, so that `actiond serve-vm` needs
// no other file and `actiond serve` has runtimes without `make runtimes`.
//
// A standalone binary is built with the build tag actiond_standalone after
// staging the payload into internal/payload/files (`make standalone` does
// both; Stage is the same step in Go): manifest.json as written by
// tools/vmpayload, and every payload file F as F.zst (zstd). Without the tag
// nothing is embedded and Embedded reports false.
//
// Extract decodes the files (streaming zstd) into a directory that
// vmhost.FindPayload then reads like the payload directory tools/vmpayload
// writes. A file whose stamp (<dir>/.<name>.embedded) matches the embedded
// compressed bytes' SHA-256 and whose size is right is not written again.
package payload

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/klauspost/compress/zstd"

	"github.com/actiond/actiond/cas"
)

// ManifestName is the manifest's name in the embedded files and in the
// extracted directory.
const ManifestName = "manifest.json"

// StageDir is the embed directory, relative to the module root.
const StageDir = "internal/payload/files"

// Manifest is the part of tools/vmpayload's manifest.json this package
// needs.
type Manifest struct {
	Arch         string   `json:"arch"`
	Kernel       string   `json:"kernel"`
	Initramfs    string   `json:"initramfs"`
	Runtimes     string   `json:"runtimes"`
	RuntimeNames []string `json:"runtime_names"`
	// HostRuntimes are runtime SquashFS images (<name>.squashfs, as `make
	// runtimes` builds them) that `actiond serve` mounts as its runtimes
	// when no --runtime-dir has any: the VM's runtimes disk holds trees
	// only the guest can finish. Added by Stage, not by the payload
	// builder.
	HostRuntimes []string `json:"host_runtimes,omitempty"`
}

// Embedded reports whether this binary carries a payload.
func Embedded() bool { return embedded }

// ReadManifest returns the embedded manifest.
func ReadManifest() (Manifest, error) {
	if !embedded {
		return Manifest{}, errNotEmbedded
	}
	return readManifest(files)
}

var errNotEmbedded = errors.New("no embedded payload: build with -tags actiond_standalone (make standalone)")

func readManifest(fsys fs.FS) (Manifest, error) {
	var m Manifest
	b, err := fs.ReadFile(fsys, "files/"+ManifestName)
	if err != nil {
		return m, fmt.Errorf("embedded payload: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("embedded payload manifest: %w", err)
	}
	return m, nil
}

// Result says what Extract did.
type Result struct {
	Dir       string
	Manifest  Manifest
	Written   []string // files decoded now
	Unchanged []string // files whose stamp matched
}

// Extract writes the embedded manifest and the files named by names (all
// embedded files when names is empty; a name is the extracted file's name,
// e.g. "runtimes.squashfs") into dir, skipping files that are already
// there and unchanged.
func Extract(dir string, names ...string) (Result, error) {
	if !embedded {
		return Result{Dir: dir}, errNotEmbedded
	}
	return extract(files, dir, names...)
}

func extract(fsys fs.FS, dir string, names ...string) (Result, error) {
	res := Result{Dir: dir}
	m, err := readManifest(fsys)
	if err != nil {
		return res, err
	}
	res.Manifest = m
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return res, err
	}
	if len(names) == 0 {
		entries, err := fs.ReadDir(fsys, "files")
		if err != nil {
			return res, err
		}
		for _, e := range entries {
			if n, ok := strings.CutSuffix(e.Name(), ".zst"); ok && !e.IsDir() {
				names = append(names, n)
			}
		}
	}
	for _, name := range names {
		if name == "" || strings.ContainsAny(name, `/\`) || strings.HasPrefix(name, ".") {
			return res, fmt.Errorf("embedded payload: bad file name %q", name)
		}
		wrote, err := extractFile(fsys, dir, name)
		if err != nil {
			return res, err
		}
		if wrote {
			res.Written = append(res.Written, name)
		} else {
			res.Unchanged = append(res.Unchanged, name)
		}
	}
	// The manifest last: a directory with a manifest is complete.
	mb, err := fs.ReadFile(fsys, "files/"+ManifestName)
	if err != nil {
		return res, err
	}
	if old, err := os.ReadFile(filepath.Join(dir, ManifestName)); err != nil || string(old) != string(mb) {
		if err := writeAtomic(filepath.Join(dir, ManifestName), func(w io.Writer) (int64, error) {
			n, err := w.Write(mb)
			return int64(n), err
		}); err != nil {
			return res, err
		}
	}
	return res, nil
}

// extractFile decodes files/<name>.zst to dir/name unless its stamp says
// it is there already.
func extractFile(fsys fs.FS, dir, name string) (bool, error) {
	src := "files/" + name + ".zst"
	sum, err := hashFile(fsys, src)
	if err != nil {
		return false, fmt.Errorf("embedded payload: %w", err)
	}
	dst := filepath.Join(dir, name)
	stamp := filepath.Join(dir, "."+name+".embedded")
	if b, err := os.ReadFile(stamp); err == nil {
		h, sizeStr, _ := strings.Cut(strings.TrimSpace(string(b)), " ")
		size, _ := strconv.ParseInt(sizeStr, 10, 64)
		if st, err := os.Stat(dst); err == nil && h == sum && st.Mode().IsRegular() && st.Size() == size {
			return false, nil
		}
	}
	f, err := fsys.Open(src)
	if err != nil {
		return false, err
	}
	defer f.Close()
	dec, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
	if err != nil {
		return false, err
	}
	defer dec.Close()
	var size int64
	if err := writeAtomic(dst, func(w io.Writer) (int64, error) {
		n, err := io.Copy(w, dec)
		size = n
		return n, err
	}); err != nil {
		return false, fmt.Errorf("extract %s: %w", name, err)
	}
	if err := writeAtomic(stamp, func(w io.Writer) (int64, error) {
		n, err := fmt.Fprintf(w, "%s %d\n", sum, size)
		return int64(n), err
	}); err != nil {
		return false, err
	}
	return true, nil
}

func hashFile(fsys fs.FS, name string) (string, error) {
	f, err := fsys.Open(name)
	if err != nil {
		return "", err
	}
	defer f.Close()
	d, err := cas.DigestReader(f)
	return d.Hash, err
}

// writeAtomic writes path through a temporary file in the same directory,
// synced and renamed into place.
func writeAtomic(path string, write func(io.Writer) (int64, error)) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := write(tmp); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Stage copies a payload directory written by tools/vmpayload into
// stageDir (normally <module>/StageDir) for embedding: manifest.json and
// the kernel, initramfs and runtimes disk it names, each compressed as
// <name>.zst, plus the host runtime images hostRuntimes (listed in the
// staged manifest's host_runtimes). It removes other *.zst files there.
func Stage(payloadDir, stageDir string, hostRuntimes ...string) error {
	mb, err := os.ReadFile(filepath.Join(payloadDir, ManifestName))
	if err != nil {
		return fmt.Errorf("stage payload: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(mb, &m); err != nil {
		return fmt.Errorf("stage payload: %s: %w", ManifestName, err)
	}
	want := map[string]bool{}
	src := map[string]string{} // staged name → source file
	for _, n := range []string{m.Kernel, m.Initramfs, m.Runtimes} {
		if n != "" {
			want[n+".zst"] = true
			src[n+".zst"] = filepath.Join(payloadDir, n)
		}
	}
	if len(hostRuntimes) > 0 {
		// The manifest as the builder wrote it, plus host_runtimes.
		var raw map[string]any
		if err := json.Unmarshal(mb, &raw); err != nil {
			return fmt.Errorf("stage payload: %s: %w", ManifestName, err)
		}
		var names []string
		for _, p := range hostRuntimes {
			n := filepath.Base(p)
			if !strings.HasSuffix(n, ".squashfs") || want[n+".zst"] {
				return fmt.Errorf("stage payload: host runtime %s: want a distinct <name>.squashfs", p)
			}
			names = append(names, n)
			want[n+".zst"] = true
			src[n+".zst"] = p
		}
		raw["host_runtimes"] = names
		if mb, err = json.MarshalIndent(raw, "", "  "); err != nil {
			return err
		}
	}
	if !want[m.Kernel+".zst"] || !want[m.Initramfs+".zst"] {
		return fmt.Errorf("stage payload: %s names no kernel or initramfs", ManifestName)
	}
	if err := os.MkdirAll(stageDir, 0o755); err != nil {
		return err
	}
	old, _ := filepath.Glob(filepath.Join(stageDir, "*.zst"))
	for _, o := range old {
		if !want[filepath.Base(o)] {
			os.Remove(o)
		}
	}
	for n := range want {
		if err := compressFile(src[n], filepath.Join(stageDir, n)); err != nil {
			return fmt.Errorf("stage payload: %w", err)
		}
	}
	return writeAtomic(filepath.Join(stageDir, ManifestName), func(w io.Writer) (int64, error) {
		n, err := w.Write(mb)
		return int64(n), err
	})
}

func compressFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return writeAtomic(dst, func(w io.Writer) (int64, error) {
		enc, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedDefault))
		if err != nil {
			return 0, err
		}
		n, err := io.Copy(enc, in)
		if err != nil {
			enc.Close()
			return n, err
		}
		return n, enc.Close()
	})
}
