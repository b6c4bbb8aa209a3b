// Package actiond wires actiond's parts into one REAPI server: the CAS and
// ByteStream services over a cas.Store (a disk store by default), the
// ActionCache, Capabilities, gRPC health and, when a sandbox is configured,
// the Execution service. New is the one composition point: the same
// Server runs on a Linux host (`actiond serve`), inside the VM guest, as a
// farm worker, and embedded in other Go programs.
//
// # DESIGN notes
//
// Composition. Every mode builds its Server with New, so the root's lock,
// the stage directory, the scrubber and the order of shutdown are the same
// everywhere. A caller changes a part by setting an Options field: Store
// (any cas.Store), WrapStore (a decorator over the store, applied once the
// root is locked), Cache, Sandbox, InputRoot, ExtraServices. The pieces New
// uses are exported for programs that assemble their own server:
// NewInputRoot, NewCapabilities, cas.NewService, actioncache.NewService,
// executor.New.
//
// Capabilities. What a cas.Store can do beyond reading and writing (pins,
// local paths, verification) is part of the cas.Store interface, never
// found by type assertion on the concrete type, so a decorator that embeds
// the store it wraps keeps all of it; stores that lack a capability embed
// cas.Base. Type assertions remain for optimisations and extras of the
// disk store (cas.BatchPutter, cas.Uploader; DiskStore's Intact,
// VerifyBlobsWithin and OnQuarantine): behind a decorator their absence
// costs speed or a second line of defence, never pins or zero-copy staging.
//
// Configuration, one style per layer:
//   - Storage engines opened on a directory take functional options that
//     return an error when given a value they cannot use:
//     cas.NewDiskStore(dir, cas.WithMaxSize(n)), actiondfs.NewInputRoot.
//   - Everything assembled from parts takes one Options struct by value
//     whose zero fields mean documented defaults: actiond.New(Options),
//     cas.NewService, actioncache.NewService, executor.New,
//     executor.NewService, remote.NewStore, worker.New, NewInputRoot,
//     NewCapabilities. (sandbox.New and vmhost take a Config struct: the
//     same style under an older name.)
//   - No positional booleans or integers with meanings: a flag is a named
//     field (actioncache.ServiceOptions.ReadOnly), not an argument.
//   - Setters after construction (BoltCache.SetLimits) exist only where a
//     value must change while the part runs, or where the constructor
//     (actioncache.Open) has no options.
package actiond

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/actiond/actiond/actioncache"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	actiondfs "github.com/actiond/actiond/fs"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	smpb "github.com/bazelbuild/remote-apis/build/bazel/semver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// durability is the disk store's Durability after NoFsync.
func (o Options) durability() cas.Durability {
	if o.NoFsync {
		return cas.NoSync
	}
	return o.Durability
}

// Version is the actiond version, set at link time for releases.
var Version = "dev"

// Options configure a Server.
type Options struct {
	// Root holds all state: cas/, ac.db, stage/, runtimes/.
	Root string
	// MaxSize bounds the CAS in bytes (0: unbounded).
	MaxSize int64
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
	// Durability is what the disk store waits for before it acknowledges
	// a blob (default cas.WriteBack: the kernel has it, it is on disk
	// within about a second, and a power loss before that is detected
	// at the next start).
	Durability cas.Durability
	// NoFsync is Durability cas.NoSync (kill -9 stays safe; a power loss
	// may lose recent blobs, which verified reads then never serve).
	NoFsync bool
	// Store, if set, is the CAS instead of the disk store under Root. Its
	// capabilities are used as they are: pins, and hardlinked or actiondfs
	// input roots when its LocalPath works (cas.IsLocal). MaxSize, NoFsync
	// and the background scrubber apply only to the disk store New opens.
	Store cas.Store
	// WrapStore, if set, decorates the store (Store, or the disk store New
	// opens under Root): a farm worker's remote CAS behind the disk as its
	// read-through cache (remote.NewCachedStore). It exists beside Store
	// because the disk store under Root may only be opened once New holds
	// the root's lock, which a caller cannot do before calling New. The
	// services and the executor use what it returns.
	WrapStore func(local cas.Store) cas.Store
	// Cache, if set, is the ActionCache instead of the bbolt file under Root.
	Cache actioncache.Cache
	// ActionCacheLimits bound the work of checking that a cached result is
	// complete, at UpdateActionResult and at every lookup; a zero field is
	// actioncache.DefaultLimits' value. They apply to the bbolt cache New
	// opens; a Cache passed in keeps its own.
	ActionCacheLimits actioncache.Limits
	// DrainTimeout bounds how long Close waits for running actions to
	// finish when Stop has not drained them; then they are cancelled
	// (default 30s). Close returns only after every action has ended, so
	// nothing writes to the stores or the root once it returns.
	DrainTimeout time.Duration
	// ScrubRate is how many bytes per second the background scrubber
	// re-hashes to find blobs whose files went bad (0: cas.DefaultScrubRate;
	// negative: no scrubber). ScrubPause is its wait after start and
	// between passes (0: cas.DefaultScrubPause).
	ScrubRate  int64
	ScrubPause time.Duration

	// Sandbox enables execution; nil serves a cache only.
	Sandbox executor.Sandbox
	// InputRoot overrides how input trees are materialised.
	InputRoot executor.InputRoot
	// InputRootKind picks a built-in strategy when InputRoot is nil:
	// "auto" (default: actiondfs when FUSE works, else hardlinks), "fuse",
	// "hardlink" or "copy".
	InputRootKind string
	// DefaultRuntime is the runtime of actions that name none (default "host").
	DefaultRuntime string
	// Concurrency is how many actions run at once (default: CPUs).
	Concurrency int
	// MaxActionTimeout caps Action.timeout (0: no cap).
	MaxActionTimeout time.Duration
	// DefaultActionTimeout is the timeout of actions that set none
	// (0: executor.DefaultActionTimeout; negative: none).
	DefaultActionTimeout time.Duration
	// MaxInputEntries and MaxInputBytes bound an action's input tree as
	// staging expands it (0: executor.DefaultMaxInputEntries and
	// DefaultMaxInputBytes; negative: none).
	MaxInputEntries int64
	MaxInputBytes   int64
	// MaxUploads and MaxUploadBytes bound the resumable ByteStream uploads
	// in progress (0: cas.DefaultMaxUploads and DefaultMaxUploadBytes).
	MaxUploads     int
	MaxUploadBytes int64
	// Observer, if set, sees every action the executor runs (metrics,
	// status page).
	Observer executor.Observer
	// GRPCOptions are added to the server Serve creates (e.g. interceptors).
	GRPCOptions []grpc.ServerOption
	// ExtraServices register more gRPC services next to actiond's own,
	// wherever Register puts them (Serve, GRPCServer, another program's
	// server); they get the Server to reach its store and executor.
	ExtraServices []func(r grpc.ServiceRegistrar, s *Server)
}

// Server is a REAPI server over one root directory.
type Server struct {
	opts Options
	log  *slog.Logger
	// Store is the CAS the services and the executor use.
	Store cas.Store
	// DiskStore is the disk store under Root (for its statistics); nil
	// when Options.Store replaced it.
	DiskStore *cas.DiskStore
	// Cache is the bbolt ActionCache; nil when Options.Cache replaced it.
	Cache *actioncache.BoltCache
	cache actioncache.Cache // what the services and the executor use
	// drained is set by Stop once it has waited for the Execution
	// service, so Close does not wait a second time.
	drained bool
	cas     *cas.Service
	ac      *actioncache.Service
	health  *health.Server
	// Executor and Execution are nil when no sandbox is configured.
	Executor  *executor.Executor
	Execution *executor.Service
	grpc      *grpc.Server
	closers   []func() error
}

// MaxMessageSize is the gRPC message limit; above the advertised batch size
// so oversized batches get a clear INVALID_ARGUMENT instead of a transport error.
const MaxMessageSize = 64 << 20

// New opens (creating if needed) the state under opts.Root.
func New(opts Options) (*Server, error) {
	if opts.Root == "" {
		return nil, fmt.Errorf("actiond: Options.Root is required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := PrivateRoot(opts.Root, log); err != nil {
		return nil, err
	}
	unlock, err := LockRoot(opts.Root)
	if err != nil {
		return nil, err
	}
	var disk *cas.DiskStore
	used := opts.Store
	if used == nil {
		disk, err = cas.NewDiskStore(filepath.Join(opts.Root, "cas"), cas.WithMaxSize(opts.MaxSize), cas.WithLogger(log), cas.WithDurability(opts.durability()))
		if err != nil {
			unlock()
			return nil, fmt.Errorf("open CAS: %w", err)
		}
		used = disk
	}
	if opts.WrapStore != nil {
		used = opts.WrapStore(used)
	}
	s := &Server{
		opts:      opts,
		log:       log,
		Store:     used,
		DiskStore: disk,
		cache:     opts.Cache,
		cas: cas.NewService(used, cas.ServiceOptions{
			Logger:         log,
			MaxUploads:     opts.MaxUploads,
			MaxUploadBytes: opts.MaxUploadBytes,
		}),
		health: health.NewServer(),
	}
	// Closers run last first: the disk store's final flush comes after
	// everything that writes to it, before the root is unlocked.
	s.closers = append(s.closers, unlock)
	if disk != nil {
		s.closers = append(s.closers, disk.Close)
	}
	s.closers = append(s.closers, func() error { s.cas.Close(); return nil })
	if s.cache == nil {
		bolt, err := actioncache.Open(filepath.Join(opts.Root, "ac.db"), used)
		if err != nil {
			s.Close()
			return nil, err
		}
		bolt.SetLimits(opts.ActionCacheLimits.OrDefault())
		s.Cache, s.cache = bolt, bolt
		s.closers = append(s.closers, bolt.Close)
	}
	s.ac = actioncache.NewService(s.cache, used, actioncache.ServiceOptions{Limits: opts.ActionCacheLimits})
	if opts.ScrubRate >= 0 && disk != nil {
		// Every mode builds its server here, so the VM guest scrubs too.
		pause := opts.ScrubPause
		if pause <= 0 {
			pause = cas.DefaultScrubPause
		}
		sctx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); disk.Scrub(sctx, opts.ScrubRate, pause) }()
		// Stopped before the store's users go away (closers run last first).
		s.closers = append(s.closers, func() error { stop(); <-done; return nil })
	}
	if opts.Sandbox != nil {
		inputRoot := opts.InputRoot
		if inputRoot == nil {
			// Before the executor is created: actiondfs clears stale
			// mounts from a crashed run, which must be gone before the
			// stage directory is emptied.
			r, closeRoot, err := NewInputRoot(InputRootOptions{
				Kind:         opts.InputRootKind,
				Store:        used,
				FUSEStateDir: filepath.Join(opts.Root, "cas", "fs"),
				Logger:       log,
			})
			if err != nil {
				s.Close()
				return nil, err
			}
			s.closers = append(s.closers, closeRoot)
			inputRoot = r
		}
		ex, err := executor.New(executor.Options{
			Store:          used,
			Cache:          s.cache,
			Sandbox:        opts.Sandbox,
			InputRoot:      inputRoot,
			StageDir:       filepath.Join(opts.Root, "cas", "stage"),
			DefaultRuntime: opts.DefaultRuntime,
			MaxTimeout:     opts.MaxActionTimeout,
			Logger:         log,
			Observer:       opts.Observer,

			DefaultTimeout:  opts.DefaultActionTimeout,
			MaxInputEntries: opts.MaxInputEntries,
			MaxInputBytes:   opts.MaxInputBytes,
		})
		if err != nil {
			s.Close()
			return nil, err
		}
		s.Executor = ex
		s.Execution = executor.NewService(ex, executor.ServiceOptions{Concurrency: opts.Concurrency})
		s.closers = append(s.closers, func() error { s.stopExecution(); ex.Wait(); return nil })
	}
	return s, nil
}

// PrivateRoot creates dir (a --root) for this process's user alone, or
// takes group and other permissions off an existing one. Nothing under it
// is for other local users: blobs, action results, the stages and mounts of
// running actions (which the sandbox shows to an action through its own
// mount namespace, not through these paths).
func PrivateRoot(dir string, log *slog.Logger) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create root %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("root %s: %w", dir, err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		if err := os.Chmod(dir, perm&0o700); err != nil {
			return fmt.Errorf("root %s: make it private: %w", dir, err)
		}
		if log != nil {
			log.Info("made the root directory private to its owner", "root", dir, "was", perm.String())
		}
	}
	return nil
}

// InputRootOptions choose one of the built-in input root strategies.
type InputRootOptions struct {
	// Kind is "auto" (or ""; actiondfs when FUSE works, else hardlinks),
	// "fuse", "hardlink" or "copy". Only "copy" works over a store that
	// keeps no local files (cas.IsLocal), and auto picks it there.
	Kind string
	// Store is the CAS the inputs come from.
	Store cas.Store
	// FUSEStateDir is where actiondfs keeps its mounts; it must be on the
	// store's file system for outputs to move in by rename.
	FUSEStateDir string
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
}

// NewInputRoot returns the input root strategy o names, and the function
// that closes it once the executor using it is done (never nil).
func NewInputRoot(o InputRootOptions) (root executor.InputRoot, closeRoot func() error, err error) {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	noClose := func() error { return nil }
	kind := o.Kind
	local, isLocal := cas.LocalFiles(o.Store)
	if !isLocal {
		// Blobs are not local files: nothing to link or to serve from.
		if kind == "fuse" || kind == "hardlink" {
			return nil, nil, fmt.Errorf("input root %s needs a store of local files (cas.IsLocal); use copy", kind)
		}
		return executor.CopyInputRoot{Store: o.Store}, noClose, nil
	}
	switch kind {
	case "", "auto", "fuse":
		if err := actiondfs.Available(); err != nil {
			if kind == "fuse" {
				return nil, nil, fmt.Errorf("input root fuse: %w", err)
			}
			log.Info("actiondfs unavailable; staging inputs with hardlinks", "reason", err)
			return executor.LinkInputRoot{Store: local}, noClose, nil
		}
		r, err := actiondfs.NewInputRoot(local, o.FUSEStateDir, actiondfs.WithLogger(log))
		if err != nil {
			return nil, nil, fmt.Errorf("start actiondfs: %w", err)
		}
		return r, r.Close, nil
	case "hardlink":
		return executor.LinkInputRoot{Store: local}, noClose, nil
	case "copy":
		return executor.CopyInputRoot{Store: o.Store}, noClose, nil
	}
	return nil, nil, fmt.Errorf("input root %q: want auto, fuse, hardlink or copy", kind)
}

// stopExecution ends the Execution service before the stores close: it
// waits up to DrainTimeout for running actions unless Stop already
// drained, then cancels what is left and waits until it has ended.
func (s *Server) stopExecution() {
	if !s.drained {
		timeout := s.opts.DrainTimeout
		if timeout <= 0 {
			timeout = 30 * time.Second
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		if !s.Execution.Drain(ctx) {
			s.log.Warn("actions still running after the drain timeout; cancelling them", "timeout", timeout)
		}
	}
	s.Execution.Stop()
}

// CASCounters are the CAS service's cumulative byte counts.
func (s *Server) CASCounters() *cas.Counters { return s.cas.Counters() }

// InputRootName is the input root strategy in use ("" without execution).
func (s *Server) InputRootName() string {
	if s.Executor == nil {
		return ""
	}
	return s.Executor.InputRootName()
}

// Register adds every service to r, for embedding in another gRPC server.
func (s *Server) Register(r grpc.ServiceRegistrar) {
	repb.RegisterContentAddressableStorageServer(r, s.cas)
	cas.RegisterByteStream(r, s.cas.ByteStream())
	repb.RegisterActionCacheServer(r, s.ac)
	repb.RegisterCapabilitiesServer(r, NewCapabilities(CapabilitiesOptions{
		MaxBatchSize: s.cas.MaxBatchSize(),
		Execution:    s.Execution != nil,
	}))
	healthpb.RegisterHealthServer(r, s.health)
	if s.Execution != nil {
		repb.RegisterExecutionServer(r, s.Execution)
	}
	for _, register := range s.opts.ExtraServices {
		register(r, s)
	}
}

// GRPCServer returns a gRPC server with every service registered and
// message limits suitable for REAPI.
func (s *Server) GRPCServer(extra ...grpc.ServerOption) *grpc.Server {
	opts := append([]grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageSize),
		grpc.MaxSendMsgSize(MaxMessageSize),
	}, extra...)
	g := grpc.NewServer(opts...)
	s.Register(g)
	return g
}

// Serve serves on l until Stop.
func (s *Server) Serve(l net.Listener) error {
	s.grpc = s.GRPCServer(s.opts.GRPCOptions...)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	return s.grpc.Serve(l)
}

// Stop drains: running RPCs finish (until ctx ends, then they are cut
// off), and so do executions nobody watches any more; new executions are
// refused.
func (s *Server) Stop(ctx context.Context) {
	s.health.Shutdown()
	if s.grpc != nil {
		done := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			s.grpc.Stop()
		}
	}
	if s.Execution != nil {
		if !s.Execution.Drain(ctx) {
			s.log.Warn("drain timeout: cancelling the actions still running")
		}
		s.drained = true
	}
}

// Close releases the state; call after Stop. Running actions are
// cancelled (after DrainTimeout if Stop did not drain) and have ended
// before the stores close and the root's lock is released.
func (s *Server) Close() error {
	var first error
	for i := len(s.closers) - 1; i >= 0; i-- {
		if err := s.closers[i](); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// CapabilitiesOptions describe the server a Capabilities service speaks for.
type CapabilitiesOptions struct {
	// MaxBatchSize is the largest total of blob bytes in one batch request
	// (cas.Service.MaxBatchSize).
	MaxBatchSize int64
	// Execution says whether the Execution service is served.
	Execution bool
}

// NewCapabilities returns the REAPI Capabilities service of an actiond
// server: SHA-256, zstd, an updatable ActionCache and, with o.Execution,
// remote execution.
func NewCapabilities(o CapabilitiesOptions) repb.CapabilitiesServer { return capabilities(o) }

type capabilities CapabilitiesOptions

func (c capabilities) GetCapabilities(ctx context.Context, req *repb.GetCapabilitiesRequest) (*repb.ServerCapabilities, error) {
	caps := &repb.ServerCapabilities{
		CacheCapabilities: &repb.CacheCapabilities{
			DigestFunctions: []repb.DigestFunction_Value{repb.DigestFunction_SHA256},
			ActionCacheUpdateCapabilities: &repb.ActionCacheUpdateCapabilities{
				UpdateEnabled: true,
			},
			MaxBatchTotalSizeBytes:          c.MaxBatchSize,
			SymlinkAbsolutePathStrategy:     executor.SymlinkAbsolutePathStrategy,
			SupportedCompressors:            []repb.Compressor_Value{repb.Compressor_ZSTD},
			SupportedBatchUpdateCompressors: []repb.Compressor_Value{repb.Compressor_ZSTD},
		},
		// Bazel 4 speaks REAPI 2.0; Buildbarn-era clients up to 2.3.
		LowApiVersion:  &smpb.SemVer{Major: 2, Minor: 0},
		HighApiVersion: &smpb.SemVer{Major: 2, Minor: 3},
	}
	if c.Execution {
		caps.ExecutionCapabilities = &repb.ExecutionCapabilities{
			DigestFunction:  repb.DigestFunction_SHA256,
			DigestFunctions: []repb.DigestFunction_Value{repb.DigestFunction_SHA256},
			ExecEnabled:     true,
		}
	}
	return caps, nil
}
