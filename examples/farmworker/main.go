// Command farmworker is a custom Buildbarn farm worker built from actiond's
// packages: the executor and sandbox of `actiond serve`, the farm's CAS and
// ActionCache through package remote (with a local read-through cache), and
// package worker speaking bb_scheduler's OperationQueue protocol. It is
// `actiond worker` cut to the bone, as a starting point for a worker with
// its own policy. Run it as root:
//
//	go run ./examples/farmworker -scheduler localhost:8983 -cas localhost:8980
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	rwpb "github.com/actiond/actiond/proto/buildbarn/remoteworker"
	"github.com/actiond/actiond/remote"
	"github.com/actiond/actiond/sandbox"
	"github.com/actiond/actiond/worker"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
)

func main() {
	scheduler := flag.String("scheduler", "localhost:8983", "bb_scheduler worker gRPC address")
	casAddr := flag.String("cas", "localhost:8980", "the farm's CAS/ActionCache gRPC address")
	root := flag.String("root", filepath.Join(os.TempDir(), "farmworker"), "state directory")
	flag.Parse()
	if err := run(*scheduler, *casAddr, *root); err != nil {
		fmt.Fprintln(os.Stderr, "farmworker:", err)
		os.Exit(1)
	}
}

func run(schedAddr, casAddr, root string) error {
	casConn, err := grpc.NewClient(casAddr, worker.DialOptions()...)
	if err != nil {
		return err
	}
	defer casConn.Close()
	schedConn, err := grpc.NewClient(schedAddr, worker.DialOptions()...)
	if err != nil {
		return err
	}
	defer schedConn.Close()

	sb, err := sandbox.New(sandbox.Config{
		Runtimes: []sandbox.Runtime{sandbox.HostRuntime()},
		StateDir: filepath.Join(root, "sandbox"),
	})
	if err != nil {
		return fmt.Errorf("sandbox (needs root on Linux): %w", err)
	}
	defer sb.Close()
	// actiond.New takes root's lock, opens the local disk store under it
	// and puts the farm's CAS behind it; actions run on the executor it
	// builds (Server.Executor), no gRPC server is started.
	srv, err := actiond.New(actiond.Options{
		Root: root,
		WrapStore: func(local cas.Store) cas.Store {
			return remote.NewCachedStore(casConn, local, remote.Options{})
		},
		Cache:         remote.NewActionCache(casConn, ""),
		Sandbox:       sb,
		InputRootKind: "hardlink",
	})
	if err != nil {
		return err
	}
	defer srv.Close() // waits for the stages of finished actions to be removed
	w, err := worker.New(worker.Options{
		Scheduler: rwpb.NewOperationQueueClient(schedConn),
		Executor:  srv.Executor,
		Store:     srv.Store,
		WorkerID:  map[string]string{"example": "farmworker"},
		Platform: &repb.Platform{Properties: []*repb.Platform_Property{
			{Name: "OSFamily", Value: "linux"},
		}},
		Concurrency: 2,
	})
	if err != nil {
		return err
	}
	// SIGINT/SIGTERM drains: running actions finish, then Run returns.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	slog.Info("farm worker running", "scheduler", schedAddr, "cas", casAddr)
	return w.Run(ctx)
}
