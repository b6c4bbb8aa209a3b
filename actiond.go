// Package actiond wires actiond's parts into one REAPI server: the CAS and
// ByteStream services over a disk store, the ActionCache, Capabilities,
// gRPC health and, when a sandbox is configured, the Execution service.
// The same Server runs on a Linux host (`actiond serve`), inside the VM
// guest, and embedded in other Go programs.
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
	// NoFsync skips fsync of each blob (kill -9 stays safe; power loss may not).
	NoFsync bool
	// WrapStore, if set, puts a store in front of the disk store that New
	// opens under Root (while holding the root's lock): a farm worker's
	// remote CAS with the disk as its read-through cache. The services and
	// the executor use what it returns; Server.Store stays the disk store.
	WrapStore func(local *cas.DiskStore) cas.Store
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
}

// Server is a REAPI server over one root directory.
type Server struct {
	opts  Options
	log   *slog.Logger
	Store *cas.DiskStore
	// Cache is the bbolt ActionCache; nil when Options.Cache replaced it.
	Cache *actioncache.BoltCache
	store cas.Store         // what the services and the executor use
	cache actioncache.Cache // likewise
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
	store, err := cas.NewDiskStore(filepath.Join(opts.Root, "cas"), cas.WithMaxSize(opts.MaxSize), cas.WithLogger(log), cas.WithFsync(!opts.NoFsync))
	if err != nil {
		unlock()
		return nil, fmt.Errorf("open CAS: %w", err)
	}
	var used cas.Store = store
	if opts.WrapStore != nil {
		used = opts.WrapStore(store)
	}
	s := &Server{
		opts:   opts,
		log:    log,
		Store:  store,
		store:  used,
		cache:  opts.Cache,
		cas:    cas.NewService(used, 0, log),
		health: health.NewServer(),
	}
	s.cas.SetUploadLimits(opts.MaxUploads, opts.MaxUploadBytes)
	s.closers = append(s.closers, unlock, func() error { s.cas.Close(); return nil })
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
	s.ac = actioncache.NewService(s.cache, used, true)
	s.ac.SetLimits(opts.ActionCacheLimits.OrDefault())
	if opts.ScrubRate >= 0 {
		// Every mode builds its server here, so the VM guest scrubs too.
		pause := opts.ScrubPause
		if pause <= 0 {
			pause = cas.DefaultScrubPause
		}
		sctx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); store.Scrub(sctx, opts.ScrubRate, pause) }()
		// Stopped before the store's users go away (closers run last first).
		s.closers = append(s.closers, func() error { stop(); <-done; return nil })
	}
	if opts.Sandbox != nil {
		inputRoot := opts.InputRoot
		if inputRoot == nil {
			r, err := s.builtinInputRoot(opts.InputRootKind)
			if err != nil {
				s.Close()
				return nil, err
			}
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

// builtinInputRoot returns the input root strategy named kind. It runs
// before the executor is created: actiondfs clears stale mounts from a
// crashed run, which must be gone before the stage directory is emptied.
func (s *Server) builtinInputRoot(kind string) (executor.InputRoot, error) {
	local, isLocal := s.store.(cas.LocalStore)
	if !isLocal {
		// Blobs are not local files: nothing to link or to serve from.
		if kind == "fuse" || kind == "hardlink" {
			return nil, fmt.Errorf("input root %s needs a store of local files (a cas.LocalStore); use copy", kind)
		}
		return executor.CopyInputRoot{Store: s.store}, nil
	}
	switch kind {
	case "", "auto", "fuse":
		if err := actiondfs.Available(); err != nil {
			if kind == "fuse" {
				return nil, fmt.Errorf("input root fuse: %w", err)
			}
			s.log.Info("actiondfs unavailable; staging inputs with hardlinks", "reason", err)
			return executor.LinkInputRoot{Store: local}, nil
		}
		r, err := actiondfs.NewInputRoot(local, filepath.Join(s.opts.Root, "cas", "fs"), actiondfs.WithLogger(s.log))
		if err != nil {
			return nil, fmt.Errorf("start actiondfs: %w", err)
		}
		s.closers = append(s.closers, r.Close)
		return r, nil
	case "hardlink":
		return executor.LinkInputRoot{Store: local}, nil
	case "copy":
		return executor.CopyInputRoot{Store: s.store}, nil
	}
	return nil, fmt.Errorf("input root %q: want auto, fuse, hardlink or copy", kind)
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
	repb.RegisterCapabilitiesServer(r, &capabilities{s})
	healthpb.RegisterHealthServer(r, s.health)
	if s.Execution != nil {
		repb.RegisterExecutionServer(r, s.Execution)
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

type capabilities struct{ s *Server }

func (c *capabilities) GetCapabilities(ctx context.Context, req *repb.GetCapabilitiesRequest) (*repb.ServerCapabilities, error) {
	caps := &repb.ServerCapabilities{
		CacheCapabilities: &repb.CacheCapabilities{
			DigestFunctions: []repb.DigestFunction_Value{repb.DigestFunction_SHA256},
			ActionCacheUpdateCapabilities: &repb.ActionCacheUpdateCapabilities{
				UpdateEnabled: true,
			},
			MaxBatchTotalSizeBytes:          c.s.cas.MaxBatchSize(),
			SymlinkAbsolutePathStrategy:     repb.SymlinkAbsolutePathStrategy_DISALLOWED,
			SupportedCompressors:            []repb.Compressor_Value{repb.Compressor_ZSTD},
			SupportedBatchUpdateCompressors: []repb.Compressor_Value{repb.Compressor_ZSTD},
		},
		// Bazel 4 speaks REAPI 2.0; Buildbarn-era clients up to 2.3.
		LowApiVersion:  &smpb.SemVer{Major: 2, Minor: 0},
		HighApiVersion: &smpb.SemVer{Major: 2, Minor: 3},
	}
	c.s.addExecutionCapabilities(caps)
	return caps, nil
}

func (s *Server) addExecutionCapabilities(caps *repb.ServerCapabilities) {
	if s.Execution == nil {
		return
	}
	caps.ExecutionCapabilities = &repb.ExecutionCapabilities{
		DigestFunction:  repb.DigestFunction_SHA256,
		DigestFunctions: []repb.DigestFunction_Value{repb.DigestFunction_SHA256},
		ExecEnabled:     true,
	}
}
