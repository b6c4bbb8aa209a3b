package vz

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const fakeSignature = "\n--fake signature, entitlements:\n"

// fakeCodesign plays macOS's codesign: "signing" appends the entitlements
// to the binary, "-d --entitlements" prints them.
type fakeCodesign struct {
	calls   []string
	missing bool
}

func (f *fakeCodesign) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	f.calls = append(f.calls, name+" "+strings.Join(args, " "))
	if name != "codesign" {
		return nil, fmt.Errorf("unexpected command %s", name)
	}
	if f.missing {
		return nil, exec.ErrNotFound
	}
	target := args[len(args)-1]
	bin, err := os.ReadFile(target)
	if err != nil {
		return nil, err
	}
	switch {
	case args[0] == "-d":
		_, ent, ok := bytes.Cut(bin, []byte(fakeSignature))
		if !ok {
			return []byte(target + ": code object is not signed at all"), errors.New("exit status 1")
		}
		return ent, nil
	case args[0] == "--sign":
		plist, err := os.ReadFile(args[4])
		if err != nil {
			return nil, err
		}
		return nil, os.WriteFile(target, append(append(bin, fakeSignature...), plist...), 0o755)
	}
	return nil, fmt.Errorf("unexpected codesign %v", args)
}

func TestEntitle(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "actiond")
	os.WriteFile(exe, []byte("binary"), 0o755)
	cache := filepath.Join(dir, "cache")
	f := &fakeCodesign{}
	opts := EntitleOptions{Exe: exe, CacheDir: cache, Env: func(string) string { return "" }, Run: f.run, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}

	// An unsigned binary gets a signed copy under the cache dir.
	signed, err := Entitle(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(signed) != filepath.Join(cache, "bin") {
		t.Fatalf("signed copy at %s", signed)
	}
	b, _ := os.ReadFile(signed)
	if !bytes.HasPrefix(b, []byte("binary")) {
		t.Fatalf("copy holds %q", b)
	}
	if st, _ := os.Stat(signed); st.Mode()&0o111 == 0 {
		t.Fatal("copy is not executable")
	}
	_, ent, _ := bytes.Cut(b, []byte(fakeSignature))
	if !bytes.Equal(ent, Entitlements) || !bytes.Contains(ent, []byte(VirtualizationEntitlement)) {
		t.Fatalf("signed with %q", ent)
	}
	signs := 0
	for _, c := range f.calls {
		if strings.HasPrefix(c, "codesign --sign - --force --entitlements ") {
			signs++
		}
	}
	if signs != 1 {
		t.Fatalf("codesign calls %q", f.calls)
	}

	// A second start reuses the signed copy: no second signing.
	f.calls = nil
	again, err := Entitle(context.Background(), opts)
	if err != nil || again != signed {
		t.Fatalf("second start: %q %v", again, err)
	}
	for _, c := range f.calls {
		if strings.Contains(c, "--sign") {
			t.Fatalf("signed again: %q", f.calls)
		}
	}

	// The re-executed copy does not re-exec again (no loop).
	f.calls = nil
	opts.Env = func(k string) string {
		if k == EntitledEnv {
			return "1"
		}
		return ""
	}
	if got, err := Entitle(context.Background(), opts); err != nil || got != "" || len(f.calls) != 0 {
		t.Fatalf("with %s set: %q %v, calls %q", EntitledEnv, got, err, f.calls)
	}

	// A binary that has the entitlement goes on as it is.
	opts.Env = func(string) string { return "" }
	opts.Exe = signed
	if got, err := Entitle(context.Background(), opts); err != nil || got != "" {
		t.Fatalf("entitled binary: %q %v", got, err)
	}

	// No codesign: an error that says what to install.
	opts.Exe = exe
	opts.Run = (&fakeCodesign{missing: true}).run
	if _, err := Entitle(context.Background(), opts); err == nil || !strings.Contains(err.Error(), "xcode-select --install") {
		t.Fatalf("without codesign: %v", err)
	}
}
