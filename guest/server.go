package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/units"
	"github.com/actiond/actiond/sandbox"
)

// serverArgv0 is the argv[0] under which the binary runs as the guest's
// server process (started by PID 1) instead of its main function; the
// package's init function recognises it, as sandbox does for its helper.
const serverArgv0 = "actiond-guest-server"

// stateEnv carries serverState from PID 1 to the server, as JSON.
const stateEnv = "ACTIOND_GUEST_STATE"

// serverState is what PID 1 prepared for the server.
type serverState struct {
	Config   Config
	Root     string            // actiond.Options.Root, on the CAS disk
	CASMount string            // mount point of the CAS disk
	StateDir string            // tmpfs scratch for the sandbox
	Runtimes []sandbox.Runtime // from the runtimes disk
	Info     map[string]any    // for the Info call: kernel, disks, boot timings
	// FailedRuntimes are runtimes of the disk that could not be prepared,
	// with the reason an action naming one gets.
	FailedRuntimes map[string]string
	// RuntimesCASBytes is the space prepared runtimes take on the CAS disk
	// (pending ones estimated).
	RuntimesCASBytes int64
	// PendingRuntimes are runtimes of the tar disk RuntimesDisk that the
	// server prepares in RuntimesDir (listed in Runtimes too).
	PendingRuntimes []pendingRuntime
	RuntimesDisk    string
	RuntimesDir     string
}

func init() {
	if len(os.Args) > 0 && os.Args[0] == serverArgv0 {
		os.Exit(serverMain())
	}
}

func serverMain() int {
	var st serverState
	if err := json.Unmarshal([]byte(os.Getenv(stateEnv)), &st); err != nil {
		fmt.Fprintf(os.Stderr, "%s: bad %s (this process is started by the guest's init): %v\n", serverArgv0, stateEnv, err)
		return 2
	}
	log := newLogger(os.Stderr, st.Config.LogLevel, "server")
	slog.SetDefault(log)
	if err := serve(st, log); err != nil {
		log.Error("server failed", "err", err)
		return 1
	}
	return 0
}

// pickDefaultRuntime returns want if it is among all, else
// DefaultRuntimeName if it is, else the first working runtime, else the
// first of all. A runtime that failed to prepare counts: actions that name
// no runtime then get its failure rather than silently another runtime.
func pickDefaultRuntime(want string, working, all []string) (string, error) {
	if want != "" {
		if !slices.Contains(all, want) {
			return "", fmt.Errorf("actiond.default_runtime=%s: no such runtime (have %v)", want, all)
		}
		return want, nil
	}
	if slices.Contains(all, DefaultRuntimeName) {
		return DefaultRuntimeName, nil
	}
	if len(working) > 0 {
		return working[0], nil
	}
	return all[0], nil
}

// serve runs the actiond.Server on the host transport until SIGTERM, then
// drains.
func serve(st serverState, log *slog.Logger) error {
	cfg := st.Config
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	maxSize := cfg.MaxSize
	if maxSize == 0 {
		var fs unix.Statfs_t
		if err := unix.Statfs(st.CASMount, &fs); err == nil {
			// The runtimes prepared on the CAS disk share it: the CAS
			// gets its share of the rest.
			maxSize = max(int64(fs.Blocks)*int64(fs.Bsize)-st.RuntimesCASBytes, 0) / 100 * defaultMaxSizePercent
		}
	}
	opts := actiond.Options{Root: st.Root, MaxSize: maxSize, Logger: log, Durability: cfg.Durability, NoFsync: !cfg.Fsync, DrainTimeout: cfg.DrainTimeout, ScrubRate: cfg.ScrubRate}
	if cfg.ScrubRate == 0 {
		opts.ScrubRate = -1 // actiond.scrub_rate=0: off
	}
	var names []string
	var gate *preparingGate
	if len(st.Runtimes) > 0 || len(st.FailedRuntimes) > 0 {
		var sb *sandbox.Sandbox
		if len(st.Runtimes) > 0 {
			var err error
			sb, err = sandbox.New(sandbox.Config{Runtimes: st.Runtimes, StateDir: st.StateDir, Logger: log})
			if err != nil {
				return err
			}
			defer sb.Close()
			names = sb.Runtimes()
		}
		var wrapped executor.Sandbox = withFailedRuntimes(sb, st.FailedRuntimes)
		if len(st.PendingRuntimes) > 0 {
			prepCtx, stopPreparing := context.WithCancel(ctx)
			gate = startPreparing(prepCtx, st, sb, log)
			defer func() {
				stopPreparing()
				gate.wait()
			}()
			wrapped = gate
		}
		def, err := pickDefaultRuntime(cfg.DefaultRuntime, names, wrapped.Runtimes())
		if err != nil {
			return err
		}
		opts.Sandbox = wrapped
		opts.DefaultRuntime = def
		opts.Concurrency = cfg.Concurrency
		if opts.Concurrency == 0 {
			opts.Concurrency = runtime.NumCPU()
		}
		opts.InputRootKind = cfg.InputRoot
	} else {
		log.Warn("no runtimes: serving as a cache only (no Execution service)")
	}
	srv, err := actiond.New(opts)
	if err != nil {
		return err
	}
	defer srv.Close()

	l, transport, err := Listen(cfg, log)
	if err != nil {
		return err
	}
	ctl := &control{st: st, transport: transport, srv: srv, gate: gate}
	g := srv.GRPCServer()
	g.RegisterService(&controlDesc, ctl)
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(l) }()

	stats := srv.DiskStore.Stats()
	log.Info("actiond guest ready",
		"transport", transport,
		"root", st.Root,
		"cas_blobs", stats.Blobs,
		"cas_bytes", units.Format(stats.Bytes),
		"max_size", units.Format(maxSize),
		"runtimes", names,
		"default_runtime", opts.DefaultRuntime,
		"boot", fmt.Sprintf("%.3fs", bootClock().Seconds()),
		"version", actiond.Version)

	if cfg.Crash == "server" {
		// Not on this goroutine: like a real bug, out of reach of any recover.
		go func() { panic("actiond.crash=server: crashing on purpose") }()
	}
	select {
	case err := <-errc:
		if err != nil && !errors.Is(err, net.ErrClosed) {
			return fmt.Errorf("serve on %s: %w", transport, err)
		}
		return fmt.Errorf("serve on %s ended", transport)
	case <-ctx.Done():
	}
	log.Info("draining", "timeout", cfg.DrainTimeout)
	dctx, cancel := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	defer cancel()
	srv.Stop(dctx) // health: NOT_SERVING (the gRPC server is ours, below)
	done := make(chan struct{})
	go func() { g.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-dctx.Done():
		log.Warn("drain timeout: cutting off running calls")
		g.Stop()
		<-done
	}
	<-errc
	log.Info("server stopped")
	return nil
}

// control implements ControlService in the server process.
type control struct {
	st        serverState
	transport string
	srv       *actiond.Server
	gate      *preparingGate // nil unless runtimes are prepared in the background
	once      sync.Once
}

func (c *control) powerOff(ctx context.Context) error {
	c.once.Do(func() {
		slog.Info("power off requested by the host")
		// PID 1 runs the shutdown: it stops this server (draining, so
		// this reply still goes out), unmounts and powers off.
		if os.Getppid() == 1 {
			_ = unix.Kill(1, unix.SIGTERM)
		} else {
			_ = unix.Kill(os.Getpid(), unix.SIGTERM)
		}
	})
	return nil
}

func (c *control) info(ctx context.Context) (*structpb.Struct, error) {
	m := map[string]any{}
	for k, v := range c.st.Info {
		m[k] = v
	}
	if c.gate != nil {
		prepared, _ := m["runtimes_prepared"].(map[string]any)
		prepared = maps.Clone(prepared)
		if prepared == nil {
			prepared = map[string]any{}
		}
		maps.Copy(prepared, c.gate.runtimesInfo())
		m["runtimes_prepared"] = prepared
	}
	m["transport"] = c.transport
	m["uptime_s"] = bootClock().Seconds()
	m["version"] = actiond.Version
	var rts []any
	for _, rt := range c.st.Runtimes {
		rts = append(rts, rt.Name)
	}
	m["runtimes"] = rts
	stats := c.srv.DiskStore.Stats()
	m["cas_blobs"] = float64(stats.Blobs)
	m["cas_bytes"] = float64(stats.Bytes)
	// Round-trip through JSON so that any value type becomes structpb's.
	data, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	var generic map[string]any
	if err := json.Unmarshal(data, &generic); err != nil {
		return nil, err
	}
	return structpb.NewStruct(generic)
}

// sandboxStateDir is the sandbox's scratch space (tmpfs).
var sandboxStateDir = filepath.Join("/run", "actiond")

// preparingGate is the runtime gate of a first boot, with the background
// preparation that resolves it.
type preparingGate struct {
	*runtimeGate
	done chan struct{}
}

// startPreparing prepares st's pending runtimes in the background (as many
// at once as there are CPUs, the default runtime first) and returns the
// gate that makes actions wait for them. When ctx ends (SIGTERM) running
// preparations are stopped; wait returns once they have cleaned up.
func startPreparing(ctx context.Context, st serverState, sb *sandbox.Sandbox, log *slog.Logger) *preparingGate {
	var names []string
	for _, p := range st.PendingRuntimes {
		names = append(names, p.Entry.Name)
	}
	g := &preparingGate{runtimeGate: newRuntimeGate(sb, st.FailedRuntimes, names, log), done: make(chan struct{})}
	workers := runtime.NumCPU()
	log.Info("preparing runtimes in the background (first boot with them: extract, configure, seal; kept on the CAS disk for later boots)",
		"runtimes", names, "at_once", min(workers, len(names)))
	go func() {
		defer close(g.done)
		t0 := time.Now()
		prepareRuntimes(ctx, st.RuntimesDisk, st.RuntimesDir, st.PendingRuntimes, workers, log, func(p pendingRuntime, rm readyMarker, err error) {
			g.resolve(p.Entry.Name, rm.info(p.Dir, false), err)
			if err == nil {
				log.Info("runtime ready", "runtime", p.Entry.Name, "extract_s", round3(rm.ExtractS), "configure_s", round3(rm.ConfigureS),
					"since_start", time.Since(t0).Round(time.Millisecond))
			}
		})
		log.Info("runtime preparation done", "took", time.Since(t0).Round(time.Millisecond))
	}()
	return g
}

// wait waits for the background preparation to end.
func (g *preparingGate) wait() { <-g.done }
