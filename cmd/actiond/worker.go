package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	rwpb "github.com/actiond/actiond/proto/buildbarn/remoteworker"
	"github.com/actiond/actiond/remote"
	"github.com/actiond/actiond/worker"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
)

// platformFlag collects repeated --platform key=value flags.
type platformFlag struct{ props []*repb.Platform_Property }

func (f *platformFlag) String() string {
	var s []string
	for _, p := range f.props {
		s = append(s, p.Name+"="+p.Value)
	}
	return strings.Join(s, ",")
}

func (f *platformFlag) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("want key=value, got %q", v)
	}
	f.props = append(f.props, &repb.Platform_Property{Name: k, Value: val})
	return nil
}

// platform returns the properties sorted by name then value, as REAPI
// requires (the scheduler compares platforms exactly).
func (f *platformFlag) platform() *repb.Platform {
	props := slices.Clone(f.props)
	slices.SortFunc(props, func(a, b *repb.Platform_Property) int {
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return strings.Compare(a.Value, b.Value)
	})
	return &repb.Platform{Properties: props}
}

// runWorker is `actiond worker`: the executor as a Buildbarn farm worker.
func runWorker(args []string) error {
	fs := newFlagSet("worker")
	schedAddr := fs.String("scheduler", "", "bb_scheduler worker gRPC address (host:port), required")
	casAddr := fs.String("cas", "", "the farm's CAS and ActionCache gRPC address (host:port, e.g. bb_storage), required")
	instance := fs.String("instance-name", "", "REAPI instance name the worker serves (instance_name_prefix)")
	sizeClass := fs.Uint("size-class", 0, "worker size class (0: size classes unused)")
	root := fs.String("root", defaultRoot(), "directory for the local CAS cache, staging and sandbox state")
	maxSize := int64(20 << 30)
	fs.Var(sizeFlag{&maxSize}, "max-size", "local CAS cache size limit (e.g. 20G; 0 = unlimited)")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	drain := fs.Duration("drain-timeout", 10*time.Minute, "on SIGINT/SIGTERM, how long running actions may take to finish (a second signal exits at once)")
	var web httpStatus
	fs.StringVar(&web.addr, "http", "", "HTTP listen address for the status page (/) and Prometheus metrics (/metrics) of the worker's actions, local cache and input roots, e.g. 127.0.0.1:8981 (empty: off)")
	var plat platformFlag
	fs.Var(&plat, "platform", "platform property key=value the worker offers (repeatable); must match the scheduler's expectations exactly")
	var ex execFlags
	ex.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *schedAddr == "" || *casAddr == "" {
		return errors.New("--scheduler and --cas are required")
	}
	log, err := newLogger(*logLevel)
	if err != nil {
		return err
	}

	// The local CAS cache, the stage and the sandbox state live under
	// --root, which defaults to serve's: New takes the root's lock (a
	// serve or another worker on it is refused) before anything there is
	// touched, and stages like serve.
	opts := actiond.Options{Root: *root, Logger: log, MaxSize: maxSize, DrainTimeout: *drain}
	closeExec, err := ex.apply(&opts, log)
	if err != nil {
		return err
	}
	defer closeExec()
	if opts.Sandbox == nil {
		return errors.New("a worker must execute: run as root and without --no-exec")
	}
	casConn, err := grpc.NewClient(*casAddr, worker.DialOptions()...)
	if err != nil {
		return fmt.Errorf("CAS %s: %w", *casAddr, err)
	}
	defer casConn.Close()
	schedConn, err := grpc.NewClient(*schedAddr, worker.DialOptions()...)
	if err != nil {
		return fmt.Errorf("scheduler %s: %w", *schedAddr, err)
	}
	defer schedConn.Close()
	opts.WrapStore = func(local cas.Store) cas.Store {
		return remote.NewCachedStore(casConn, local, remote.Options{InstanceName: *instance, Logger: log})
	}
	opts.Cache = remote.NewActionCache(casConn, *instance)
	// Workers default to hardlinks from the local cache: "auto" does not
	// pick FUSE here; --input-root=fuse opts in.
	if opts.InputRootKind == "" || opts.InputRootKind == "auto" {
		opts.InputRootKind = "hardlink"
	}
	web.prepare(&opts)
	srv, err := actiond.New(opts)
	if err != nil {
		return err
	}
	stopWeb, err := web.start(srv, log)
	if err != nil {
		srv.Close()
		return err
	}
	defer stopWeb()
	// Close waits for the executor's stage cleanup, then closes the input
	// root and the stores, and releases the lock last.
	defer srv.Close()
	hostname, _ := os.Hostname()
	w, err := worker.New(worker.Options{
		Scheduler:          rwpb.NewOperationQueueClient(schedConn),
		Executor:           srv.Executor,
		Store:              srv.Store,
		WorkerID:           map[string]string{"hostname": hostname},
		InstanceNamePrefix: *instance,
		Platform:           plat.platform(),
		SizeClass:          uint32(*sizeClass),
		Concurrency:        opts.Concurrency,
		Logger:             log,
	})
	if err != nil {
		return err
	}
	log.Info("actiond worker starting",
		"scheduler", *schedAddr, "cas", *casAddr, "instance_name", *instance,
		"platform", plat.String(), "runners", opts.Concurrency,
		"runtimes", opts.Sandbox.Runtimes(), "input_root", srv.InputRootName(),
		"root", *root, "version", actiond.Version)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	select {
	case err := <-done:
		return err
	case s := <-sigs:
		log.Info("draining: finishing running actions, taking no new ones", "signal", s.String(), "timeout", *drain)
		cancel()
	}
	timer := time.NewTimer(*drain)
	defer timer.Stop()
	select {
	case err := <-done:
		log.Info("drained")
		return err
	case s := <-sigs:
		return fmt.Errorf("second %s during drain: exiting with actions still running", s)
	case <-timer.C:
		return fmt.Errorf("drain did not finish within %s: exiting with actions still running", *drain)
	}
}
