package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/units"
)

// runStats is `actiond stats`: what a root not in use holds. Hit ratios
// are counted per server run and not persisted; a running server shows
// them on its --http status page and metrics.
func runStats(args []string) error {
	o := newOfflineRoot("stats", "describe", "warn")
	root := o.root
	log, unlock, err := o.open(args, nil)
	if err != nil {
		return err
	}
	defer unlock()
	store, err := cas.NewDiskStore(filepath.Join(*root, "cas"), cas.WithLogger(log))
	if err != nil {
		return fmt.Errorf("open CAS: %w", err)
	}
	defer store.Close()
	st := store.Stats()
	fmt.Printf("root:          %s\n", *root)
	fmt.Printf("CAS blobs:     %d\n", st.Blobs)
	fmt.Printf("CAS bytes:     %s (%d)\n", units.Format(st.Bytes), st.Bytes)
	if q, err := os.ReadDir(filepath.Join(*root, "cas", cas.QuarantineDir)); err == nil {
		fmt.Printf("quarantined:   %d blobs (in %s)\n", len(q), filepath.Join(*root, "cas", cas.QuarantineDir))
	}
	acPath := filepath.Join(*root, "ac.db")
	if _, err := os.Stat(acPath); err != nil {
		fmt.Println("ActionCache:   none")
		return nil
	}
	ac, err := actioncache.Open(acPath, store)
	if err != nil {
		return err
	}
	defer ac.Close()
	fmt.Printf("ActionCache:   %d results\n", ac.Stats().Entries)
	fmt.Println("hit ratio:     not persisted; see a running server's --http page or actiond_ac_hit_ratio")
	return nil
}
