package executor

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

func newStore(t *testing.T) *cas.DiskStore {
	t.Helper()
	s, err := cas.NewDiskStore(filepath.Join(t.TempDir(), "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func putBlob(t *testing.T, s cas.Store, data []byte) cas.Digest {
	t.Helper()
	d := cas.DigestOf(data)
	if err := s.Put(context.Background(), d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	return d
}

func putDir(t *testing.T, s cas.Store, dir *repb.Directory) cas.Digest {
	t.Helper()
	data, err := proto.Marshal(dir)
	if err != nil {
		t.Fatal(err)
	}
	return putBlob(t, s, data)
}

func TestLoadInputTreeRejectsMalformedDirectories(t *testing.T) {
	s := newStore(t)
	f := putBlob(t, s, []byte("x")).Proto()
	sub := putDir(t, s, &repb.Directory{}).Proto()
	cases := map[string]*repb.Directory{
		"dotdot":      {Files: []*repb.FileNode{{Name: "..", Digest: f}}},
		"dot":         {Directories: []*repb.DirectoryNode{{Name: ".", Digest: sub}}},
		"slash":       {Files: []*repb.FileNode{{Name: "a/b", Digest: f}}},
		"empty":       {Files: []*repb.FileNode{{Name: "", Digest: f}}},
		"duplicate":   {Files: []*repb.FileNode{{Name: "a", Digest: f}, {Name: "a", Digest: f}}},
		"cross-kind":  {Files: []*repb.FileNode{{Name: "a", Digest: f}}, Directories: []*repb.DirectoryNode{{Name: "a", Digest: sub}}},
		"unsorted":    {Files: []*repb.FileNode{{Name: "b", Digest: f}, {Name: "a", Digest: f}}},
		"abs symlink": {Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "/etc/shadow"}}},
		"bad digest":  {Files: []*repb.FileNode{{Name: "a", Digest: &repb.Digest{Hash: "zz", SizeBytes: 1}}}},
	}
	for name, dir := range cases {
		t.Run(name, func(t *testing.T) {
			root := putDir(t, s, dir)
			_, err := LoadInputTree(context.Background(), s, root)
			var inv *InvalidInputError
			if !errors.As(err, &inv) {
				t.Fatalf("LoadInputTree = %v, want InvalidInputError", err)
			}
		})
	}
}

func TestLoadInputTreeReportsEveryMissingBlob(t *testing.T) {
	s := newStore(t)
	absentFile := cas.DigestOf([]byte("not uploaded"))
	absentDir := cas.DigestOf([]byte("no such directory"))
	root := putDir(t, s, &repb.Directory{
		Files:       []*repb.FileNode{{Name: "f", Digest: absentFile.Proto()}},
		Directories: []*repb.DirectoryNode{{Name: "d", Digest: absentDir.Proto()}},
	})
	_, err := LoadInputTree(context.Background(), s, root)
	var missing *MissingBlobsError
	if !errors.As(err, &missing) {
		t.Fatalf("LoadInputTree = %v, want MissingBlobsError", err)
	}
	got := map[cas.Digest]bool{}
	for _, d := range missing.Digests {
		got[d] = true
	}
	if !got[absentFile] || !got[absentDir] || len(got) != 2 {
		t.Fatalf("missing = %v, want %v and %v", missing.Digests, absentFile, absentDir)
	}
	st := StatusProto(err)
	if st.Code != 9 /* FAILED_PRECONDITION */ || len(st.Details) != 1 {
		t.Fatalf("status = %v, want FAILED_PRECONDITION with a PreconditionFailure", st)
	}
}

func TestCleanRelPath(t *testing.T) {
	for _, p := range []string{"", "/abs", "a/../b", "..", "./.", "a/\x00"} {
		if _, err := cleanRelPath("output", p); err == nil {
			t.Errorf("cleanRelPath(%q) accepted", p)
		}
	}
	for in, want := range map[string]string{"a/b": "a/b", "./a//b/": "a/b", "a/./b": "a/b"} {
		if got, err := cleanRelPath("output", in); err != nil || got != want {
			t.Errorf("cleanRelPath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestWorkingDirectoryThroughSymlinkIsRejected(t *testing.T) {
	s := newStore(t)
	root := putDir(t, s, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "up", Target: "../../.."}}})
	tree, err := LoadInputTree(context.Background(), s, root)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tree.lookupDir("up/x"); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Fatalf("lookupDir through symlink = %v, want an error naming the symlink", err)
	}
}

func TestLinkInputRootKeepsSharedBlobsReadOnly(t *testing.T) {
	s := newStore(t)
	data := putBlob(t, s, []byte("#!/bin/sh\necho hi\n"))
	sub := putDir(t, s, &repb.Directory{Files: []*repb.FileNode{{Name: "plain", Digest: data.Proto()}}})
	root := putDir(t, s, &repb.Directory{
		Files:       []*repb.FileNode{{Name: "tool", Digest: data.Proto(), IsExecutable: true}, {Name: "zero", Digest: cas.EmptyDigest.Proto()}},
		Directories: []*repb.DirectoryNode{{Name: "sub", Digest: sub.Proto()}},
		Symlinks:    []*repb.SymlinkNode{{Name: "link", Target: "sub/plain"}},
	})
	tree, err := LoadInputTree(context.Background(), s, root)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "root")
	if _, err := (LinkInputRoot{Store: s}).Stage(context.Background(), tree, dir); err != nil {
		t.Fatal(err)
	}
	tool, _ := os.Stat(filepath.Join(dir, "tool"))
	plain, _ := os.Stat(filepath.Join(dir, "sub/plain"))
	if tool.Mode().Perm() != 0o555 || plain.Mode().Perm() != 0o444 {
		t.Fatalf("modes: tool %v, plain %v; want 0555 and 0444", tool.Mode(), plain.Mode())
	}
	if os.SameFile(tool, plain) {
		t.Fatal("executable input shares an inode with the read-only blob")
	}
	if target, err := os.Readlink(filepath.Join(dir, "link")); err != nil || target != "sub/plain" {
		t.Fatalf("symlink = %q, %v", target, err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "zero")); err != nil || len(b) != 0 {
		t.Fatalf("empty file = %q, %v", b, err)
	}
}

func TestParsePlatform(t *testing.T) {
	pl := func(kv ...string) *repb.Platform {
		p := &repb.Platform{}
		for i := 0; i < len(kv); i += 2 {
			p.Properties = append(p.Properties, &repb.Platform_Property{Name: kv[i], Value: kv[i+1]})
		}
		return p
	}
	got, err := ParsePlatform(pl("libc", "glibc2.36"), pl("libc", "host", "memory", "64M", "cpu", "0.5", "pids", "32", "OSFamily", "Linux", "mutates_inputs", "1"))
	if err != nil {
		t.Fatal(err)
	}
	if got.Runtime != "glibc2.36" || got.Limits.MemoryBytes != 64<<20 || got.Limits.CPUMillis != 500 || got.Limits.Pids != 32 || !got.MutatesInputs {
		t.Fatalf("ParsePlatform = %+v", got)
	}
	if len(got.Ignored) != 1 || got.Ignored[0] != "OSFamily" {
		t.Fatalf("Ignored = %v", got.Ignored)
	}
	for _, bad := range [][]string{{"memory", "lots"}, {"cpu", "-1"}, {"pids", "0"}, {"mutates_inputs", "maybe"}} {
		if _, err := ParsePlatform(pl(bad...), nil); err == nil {
			t.Errorf("ParsePlatform(%v) accepted", bad)
		}
	}
}

func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }

func putDirB(b *testing.B, s cas.Store, dir *repb.Directory) cas.Digest {
	data, err := proto.Marshal(dir)
	if err != nil {
		b.Fatal(err)
	}
	return putBlobB(b, s, data)
}
