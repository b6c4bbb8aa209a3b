//go:build linux

package sandbox_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
)

func TestParseIDRange(t *testing.T) {
	for in, want := range map[string]sandbox.IDRange{
		"1879048192-1879052287": sandbox.DefaultIDs,
		"200000+16":             {First: 200000, Count: 16},
		"5000-5000":             {First: 5000, Count: 1},
	} {
		if got, err := sandbox.ParseIDRange(in); err != nil || got != want {
			t.Errorf("ParseIDRange(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "1000", "0-10", "10-5", "x-y", "2147483647+2", "-5-10"} {
		if r, err := sandbox.ParseIDRange(in); err == nil {
			t.Errorf("ParseIDRange(%q) = %v; want an error", in, r)
		}
	}
	if sandbox.DefaultIDs.String() != "1879048192-1879052287" {
		t.Errorf("DefaultIDs = %s", sandbox.DefaultIDs)
	}
}

// TestEachRunHasItsOwnUser: runs at the same time get different ids from
// the range (the lowest free one), named in their /etc/passwd; a run
// waits while every id is in use; and a released id is used again.
func TestEachRunHasItsOwnUser(t *testing.T) {
	testutil.RequireRoot(t)
	const first = 1879100000
	sb, err := sandbox.New(sandbox.Config{
		Runtimes: []sandbox.Runtime{sandbox.HostRuntime()},
		IDs:      sandbox.IDRange{First: first, Count: 2},
		StateDir: t.TempDir(),
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()

	// Two runs that wait for a file the test creates once both started.
	roots := [2]string{newExecRoot(t, false), newExecRoot(t, false)}
	type result struct {
		out string
		err error
	}
	results := make(chan result, 2)
	for _, root := range roots {
		s := shSpec(t, root, `id -u > out/uid; id -g; id -un; while [ ! -e out/release ]; do sleep 0.01; done`)
		go func() {
			res, err := sb.Run(context.Background(), s)
			out, _ := os.ReadFile(s.StdoutPath)
			if err == nil && res.ExitCode != 0 {
				err = errors.New("exit " + strconv.Itoa(res.ExitCode))
			}
			results <- result{string(out), err}
		}()
	}
	uids := map[string]bool{}
	for _, root := range roots {
		for {
			b, err := os.ReadFile(filepath.Join(root, "out", "uid"))
			if err == nil && len(b) > 0 {
				uids[strings.TrimSpace(string(b))] = true
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if !uids[strconv.Itoa(first)] || !uids[strconv.Itoa(first+1)] {
		t.Errorf("concurrent runs had uids %v; want %d and %d", uids, first, first+1)
	}

	// Both ids are in use: a third run waits (here until its context ends).
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := sb.Run(ctx, shSpec(t, newExecRoot(t, false), "true")); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("a third run with every id in use: %v; want it to wait for one", err)
	}
	// An id reserved for an executor's action is not handed out either.
	if _, _, err := sb.AcquireUser(ctx); err == nil {
		t.Error("AcquireUser succeeded with every id in use")
	}

	for _, root := range roots {
		if err := os.WriteFile(filepath.Join(root, "out", "release"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for range roots {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		lines := strings.Split(r.out, "\n")
		if len(lines) < 2 || lines[1] != "actiond" || !strings.HasPrefix(lines[0], "18791") {
			t.Errorf("id -g; id -un printed %q", r.out)
		}
	}

	// Free again: the lowest id first, and a run as a given user.
	u, release, err := sb.AcquireUser(context.Background())
	if err != nil || u != (executor.User{UID: first, GID: first}) {
		t.Fatalf("AcquireUser = %v, %v; want %d", u, err, first)
	}
	s := shSpec(t, newExecRoot(t, false), "id -u; id -g; stat -c '%U %G %a' /execroot/out")
	s.User = &u
	if got, want := mustSucceed(t, sb, s), strconv.Itoa(first)+"\n"+strconv.Itoa(first)+"\nroot actiond 1770\n"; got != want {
		t.Errorf("run as %v printed %q; want %q", u, got, want)
	}
	release()
}

// TestFixedUser: Config.UID/GID make every run use the same ids.
func TestFixedUser(t *testing.T) {
	testutil.RequireRoot(t)
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, UID: 65534, GID: 65534, StateDir: t.TempDir(),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	u1, r1, _ := sb.AcquireUser(context.Background())
	u2, r2, _ := sb.AcquireUser(context.Background())
	defer r1()
	defer r2()
	if u1 != (executor.User{UID: 65534, GID: 65534}) || u2 != u1 {
		t.Errorf("users %v %v; want 65534 for both", u1, u2)
	}
	if got := mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), "id -u; id -un")); got != "65534\nnobody\n" {
		t.Errorf("got %q", got)
	}
}

func TestInvalidIDRange(t *testing.T) {
	testutil.RequireRoot(t)
	_, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, IDs: sandbox.IDRange{First: 0, Count: 10}, StateDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "root") {
		t.Errorf("a range with root: %v", err)
	}
}
