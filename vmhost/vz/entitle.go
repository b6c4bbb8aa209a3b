package vz

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/actiond/actiond/cas"
)

// Entitlements is the entitlements plist a binary needs to start a
// Virtualization.framework VM (com.apple.security.virtualization); `make
// darwin` signs with it too.
//
//go:embed actiond.entitlements
var Entitlements []byte

// VirtualizationEntitlement is the entitlement Virtualization.framework
// checks.
const VirtualizationEntitlement = "com.apple.security.virtualization"

// EntitledEnv marks a process re-executed by ReexecEntitled: it never
// re-executes again (no loop if signing did not help).
const EntitledEnv = "ACTIOND_VZ_REEXEC"

// Runner runs a command and returns its combined output (exec in
// production, a fake in tests).
type Runner func(ctx context.Context, name string, args ...string) ([]byte, error)

// ExecRunner runs commands with os/exec.
func ExecRunner(ctx context.Context, name string, args ...string) ([]byte, error) {
	return exec.CommandContext(ctx, name, args...).CombinedOutput()
}

// EntitleOptions are the inputs of Entitle.
type EntitleOptions struct {
	Exe      string // the running binary
	CacheDir string // where the signed copy goes
	Env      func(string) string
	Run      Runner
	Log      *slog.Logger
}

// Entitle decides whether the running binary must be replaced by a signed
// copy before it can start a VM, and makes that copy. It returns "" when
// the binary may go on (it has the entitlement, or it is already the
// re-executed copy), else the path of an ad-hoc signed copy of Exe with
// Entitlements (codesign --sign - --entitlements), kept under
// CacheDir/bin by the binary's hash so that later starts reuse it.
func Entitle(ctx context.Context, o EntitleOptions) (string, error) {
	if o.Env(EntitledEnv) != "" {
		return "", nil
	}
	if has, err := hasEntitlement(ctx, o.Run, o.Exe); err != nil {
		return "", err
	} else if has {
		return "", nil
	}
	sum, err := fileHash(o.Exe)
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", o.Exe, err)
	}
	dir := filepath.Join(o.CacheDir, "bin")
	dst := filepath.Join(dir, "actiond-"+sum[:16])
	if has, _ := hasEntitlement(ctx, o.Run, dst); has {
		o.Log.Info("this binary lacks the virtualization entitlement; using its signed copy", "copy", dst)
		return dst, nil
	}
	o.Log.Info("this binary lacks the virtualization entitlement; making an ad-hoc signed copy with codesign",
		"binary", o.Exe, "copy", dst, "entitlement", VirtualizationEntitlement)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	plist := filepath.Join(dir, "actiond.entitlements")
	if err := os.WriteFile(plist, Entitlements, 0o644); err != nil {
		return "", err
	}
	tmp := dst + ".tmp"
	if err := copyFile(o.Exe, tmp); err != nil {
		return "", err
	}
	if out, err := o.Run(ctx, "codesign", "--sign", "-", "--force", "--entitlements", plist, tmp); err != nil {
		os.Remove(tmp)
		if errors.Is(err, exec.ErrNotFound) {
			return "", fmt.Errorf("codesign not found (install the Xcode command line tools: xcode-select --install), or sign the binary yourself: codesign --sign - --entitlements vmhost/vz/actiond.entitlements %s", o.Exe)
		}
		return "", fmt.Errorf("codesign %s: %w: %s", tmp, err, strings.TrimSpace(string(out)))
	}
	if err := os.Rename(tmp, dst); err != nil {
		return "", err
	}
	return dst, nil
}

// hasEntitlement asks codesign for path's entitlements; a missing file or
// an unsigned binary has none.
func hasEntitlement(ctx context.Context, run Runner, path string) (bool, error) {
	if _, err := os.Stat(path); err != nil {
		return false, nil
	}
	out, err := run(ctx, "codesign", "-d", "--entitlements", "-", "--xml", path)
	if errors.Is(err, exec.ErrNotFound) {
		return false, fmt.Errorf("codesign not found (install the Xcode command line tools: xcode-select --install): it is needed to give actiond the %s entitlement", VirtualizationEntitlement)
	}
	// codesign fails for an unsigned binary: no entitlements.
	return err == nil && strings.Contains(string(out), VirtualizationEntitlement), nil
}

func fileHash(path string) (string, error) {
	d, err := cas.DigestFile(path)
	return d.Hash, err
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(dst)
		return err
	}
	return out.Close()
}
