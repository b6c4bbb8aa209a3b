package cas

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/internal/testutil"
)

// An unnamed upload gets its name with AT_EMPTY_PATH when the server may
// (root), and through /proc/self/fd when that is refused (a server run by
// a normal user, before Linux 6.10): tried on a thread without
// CAP_DAC_READ_SEARCH, since capabilities are per thread.
func TestLinkAnonWithoutTheCapability(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	open := func() *os.File {
		t.Helper()
		f, err := openAnon(dir)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	link := func(f *os.File, name string) {
		t.Helper()
		defer f.Close()
		f.Write([]byte(name))
		if err := linkAnon(f, filepath.Join(dir, name)); err != nil {
			t.Fatalf("link %s: %v", name, err)
		}
		if b, err := os.ReadFile(filepath.Join(dir, name)); err != nil || !bytes.Equal(b, []byte(name)) {
			t.Fatalf("%s reads %q, %v", name, b, err)
		}
	}
	defer noEmptyPathLinks.Store(false)
	noEmptyPathLinks.Store(false)
	link(open(), "as-root")
	if noEmptyPathLinks.Load() {
		t.Fatal("root was refused AT_EMPTY_PATH")
	}

	done := make(chan struct{})
	go func() {
		defer close(done)
		// Never unlocked: the thread, with its reduced capabilities,
		// ends with this goroutine.
		runtime.LockOSThread()
		// Opened before the capability is dropped: since Linux 6.10 the
		// opener's own credentials may link it without the capability.
		f := open()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var caps [2]unix.CapUserData
		if err := unix.Capget(&hdr, &caps[0]); err != nil {
			t.Error(err)
			return
		}
		caps[unix.CAP_DAC_READ_SEARCH/32].Effective &^= 1 << (unix.CAP_DAC_READ_SEARCH % 32)
		if err := unix.Capset(&hdr, &caps[0]); err != nil {
			t.Error(err)
			return
		}
		link(f, "without-cap")
		if !noEmptyPathLinks.Load() {
			t.Error("AT_EMPTY_PATH is still tried after it was refused")
		}
		link(open(), "after-the-refusal")
	}()
	<-done
}
