// Command customsandbox serves REAPI (CAS, ActionCache, Execution) on
// 127.0.0.1:8990 with actiond embedded and a Sandbox of its own: a
// decorator over the Linux sandbox that applies a site policy (every action
// gets at most 2 GiB of memory and 512 tasks, whatever it asks for) and logs
// each action. Any type with Run and Runtimes is an executor.Sandbox; the
// wiring is one actiond.New call. Run it as root:
//
//	go run ./examples/customsandbox
//	bazel build --remote_executor=grpc://127.0.0.1:8990 //...
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/sandbox"
)

// capped is the custom Sandbox: the policy, then the real sandbox.
type capped struct {
	executor.Sandbox
	memory, pids int64
}

func (c capped) Run(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error) {
	if l := &spec.Limits; l.MemoryBytes == 0 || l.MemoryBytes > c.memory {
		l.MemoryBytes = c.memory
	}
	if l := &spec.Limits; l.Pids == 0 || l.Pids > c.pids {
		l.Pids = c.pids
	}
	t0 := time.Now()
	res, err := c.Sandbox.Run(ctx, spec)
	slog.Info("action", "args", spec.Args, "runtime", spec.Runtime, "took", time.Since(t0), "err", err)
	return res, err
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "customsandbox:", err)
		os.Exit(1)
	}
}

func run() error {
	root := filepath.Join(os.TempDir(), "actiond-customsandbox")
	sb, err := sandbox.New(sandbox.Config{Runtimes: []sandbox.Runtime{sandbox.HostRuntime()}, StateDir: filepath.Join(root, "sandbox")})
	if err != nil {
		return fmt.Errorf("sandbox (needs root on Linux): %w", err)
	}
	defer sb.Close()
	srv, err := actiond.New(actiond.Options{Root: root, Sandbox: capped{Sandbox: sb, memory: 2 << 30, pids: 512}})
	if err != nil {
		return err
	}
	defer srv.Close()
	l, err := net.Listen("tcp", "127.0.0.1:8990")
	if err != nil {
		return err
	}
	slog.Info("serving REAPI with a capped sandbox", "addr", l.Addr().String(), "root", root)
	// Until SIGINT or SIGTERM, then drain: Close (deferred) unmounts the
	// input roots and releases the root.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		srv.Stop(dctx)
	}()
	return srv.Serve(l)
}
