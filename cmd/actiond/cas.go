package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/units"
)

// errCorrupt makes `cas verify` exit non-zero after its report.
var errCorrupt = errors.New("corrupt blobs found")

func casUsage() error {
	return fmt.Errorf("usage: actiond cas verify|gc [flags] (run \"actiond cas verify -h\")")
}

// runCAS is `actiond cas verify|gc`: maintenance of a root no server is
// using.
func runCAS(args []string) error {
	if len(args) == 0 {
		return casUsage()
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		fmt.Fprintln(os.Stderr, casUsage())
		return flag.ErrHelp
	case "verify":
		return runCASVerify(args[1:])
	case "gc":
		return runCASGC(args[1:])
	}
	return casUsage()
}

// offlineRoot is what the commands working on a root that no server is
// using (cas verify, cas gc, stats) share: --root, --log-level, and the
// root's lock.
type offlineRoot struct {
	fs             *flag.FlagSet
	root, logLevel *string
}

// newOfflineRoot makes the flag set of command name; purpose completes
// "actiond root to ..." in --root's help.
func newOfflineRoot(name, purpose, defaultLevel string) *offlineRoot {
	fs := newFlagSet(name)
	return &offlineRoot{
		fs:       fs,
		root:     fs.String("root", defaultRoot(), "actiond root to "+purpose+" (not in use by a server)"),
		logLevel: fs.String("log-level", defaultLevel, "log level: debug, info, warn, error"),
	}
}

// open parses args, runs check (if any) on the parsed flags, and returns
// the logger and the unlock function of the root's lock.
func (o *offlineRoot) open(args []string, check func() error) (*slog.Logger, func() error, error) {
	if err := o.fs.Parse(args); err != nil {
		return nil, nil, err
	}
	if o.fs.NArg() > 0 {
		return nil, nil, fmt.Errorf("unexpected arguments %q", o.fs.Args())
	}
	if check != nil {
		if err := check(); err != nil {
			return nil, nil, err
		}
	}
	log, err := newLogger(*o.logLevel)
	if err != nil {
		return nil, nil, err
	}
	unlock, err := lockExistingRoot(*o.root)
	if err != nil {
		return nil, nil, err
	}
	return log, unlock, nil
}

// lockExistingRoot takes the root's lock, refusing a root that does not
// exist (a typo should not create one).
func lockExistingRoot(root string) (func() error, error) {
	if _, err := os.Stat(filepath.Join(root, "cas")); err != nil {
		return nil, fmt.Errorf("%s is not an actiond root: %w", root, err)
	}
	unlock, err := actiond.LockRoot(root)
	if errors.Is(err, actiond.ErrRootInUse) {
		return nil, fmt.Errorf("%w; stop the server using it first", err)
	}
	return unlock, err
}

func runCASVerify(args []string) error {
	o := newOfflineRoot("cas verify", "verify", "info")
	root := o.root
	log, unlock, err := o.open(args, nil)
	if err != nil {
		return err
	}
	defer unlock()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	dir := filepath.Join(*root, "cas")
	log.Info("verifying CAS", "dir", dir)
	rep, err := cas.Verify(ctx, dir, log)
	if err != nil {
		return err
	}
	log.Info("verified CAS", "blobs", rep.Blobs, "bytes", units.Format(rep.Bytes), "corrupt", len(rep.Corrupt), "took", rep.Took.Round(1e6))
	for _, c := range rep.Corrupt {
		line := fmt.Sprintf("corrupt %s (content hashes to %s, %d bytes)", c.Hash, c.Got, c.Size)
		if c.Quarantined != "" {
			line += " -> " + c.Quarantined
		}
		if c.Err != nil {
			line += ": " + c.Err.Error()
		}
		fmt.Println(line)
	}
	if len(rep.Corrupt) > 0 {
		return fmt.Errorf("%w: %d (moved to %s; clients will upload them again)", errCorrupt, len(rep.Corrupt), filepath.Join(dir, cas.QuarantineDir))
	}
	return nil
}

func runCASGC(args []string) error {
	o := newOfflineRoot("cas gc", "shrink", "info")
	root := o.root
	var maxSize int64
	o.fs.Var(sizeFlag{&maxSize}, "max-size", "evict least recently used blobs until the CAS is at most this size (e.g. 10G; required)")
	log, unlock, err := o.open(args, func() error {
		if maxSize <= 0 {
			return errors.New("--max-size is required (e.g. --max-size=10G)")
		}
		return nil
	})
	if err != nil {
		return err
	}
	defer unlock()
	log.Info("indexing CAS", "dir", filepath.Join(*root, "cas"))
	store, err := cas.NewDiskStore(filepath.Join(*root, "cas"), cas.WithLogger(log))
	if err != nil {
		return fmt.Errorf("open CAS: %w", err)
	}
	defer store.Close()
	before := store.Stats()
	log.Info("evicting", "blobs", before.Blobs, "bytes", units.Format(before.Bytes), "max_size", units.Format(maxSize))
	n := store.Evict(maxSize)
	store.WaitCompactions() // packs left mostly dead are rewritten now, before the exit
	after := store.Stats()
	fmt.Printf("evicted %d blobs (%s); %d blobs, %s stored\n", n, units.Format(before.Bytes-after.Bytes), after.Blobs, units.Format(after.Bytes))
	return nil
}
