package cas_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/testutil"
)

func TestVerifyQuarantinesCorruptBlobs(t *testing.T) {
	for _, packs := range []bool{false, true} {
		t.Run(fmt.Sprintf("packs=%v", packs), func(t *testing.T) { testVerifyQuarantines(t, packs) })
	}
}

func testVerifyQuarantines(t *testing.T, packs bool) {
	ctx := context.Background()
	root := t.TempDir()
	dir := filepath.Join(root, "cas")
	store, err := cas.NewDiskStore(dir, cas.WithFsync(false), cas.WithSmallBlobPacks(packs))
	if err != nil {
		t.Fatal(err)
	}
	var ds []cas.Digest
	for i := range 20 {
		data := bytes.Repeat([]byte{byte(i)}, 100+i)
		d := cas.DigestOf(data)
		if err := store.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	bad := ds[7]
	// Corrupt one the way a bad disk would: every byte changed.
	testutil.CorruptBlob(t, root, bad.Hash, "same-size")
	rotten := bytes.Repeat([]byte{^byte(7)}, int(bad.Size))
	p := filepath.Join(dir, "sha256", bad.Hash[:2], bad.Hash)

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	rep, err := cas.Verify(ctx, dir, log)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Blobs != int64(len(ds)) {
		t.Errorf("verified %d blobs, want %d", rep.Blobs, len(ds))
	}
	if len(rep.Corrupt) != 1 || rep.Corrupt[0].Hash != bad.Hash || rep.Corrupt[0].Got != cas.DigestOf(rotten).Hash {
		t.Fatalf("corrupt = %+v, want just %s", rep.Corrupt, bad.Hash)
	}
	q := filepath.Join(dir, cas.QuarantineDir, bad.Hash)
	if rep.Corrupt[0].Quarantined != q {
		t.Errorf("quarantined to %q, want %q", rep.Corrupt[0].Quarantined, q)
	}
	if b, err := os.ReadFile(q); err != nil || !bytes.Equal(b, rotten) {
		t.Errorf("quarantined copy: %q, %v", b, err)
	}
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("corrupt blob still in place: %v", err)
	}

	// A store opened afterwards (a server restart) reports it missing, so
	// clients upload it again; the rest are intact.
	store2, err := cas.NewDiskStore(dir, cas.WithFsync(false), cas.WithSmallBlobPacks(packs))
	if err != nil {
		t.Fatal(err)
	}
	missing, err := store2.FindMissing(ctx, ds)
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) != 1 || missing[0] != bad {
		t.Errorf("missing after verify = %v, want [%s]", missing, bad)
	}
	rep, err = cas.Verify(ctx, dir, log)
	if err != nil || len(rep.Corrupt) != 0 || rep.Blobs != int64(len(ds)-1) {
		t.Errorf("second verify: %+v, %v; want %d clean blobs", rep, err, len(ds)-1)
	}
}
