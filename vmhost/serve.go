package vmhost

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"
)

// ServeOptions tune Serve.
type ServeOptions struct {
	// Logger (default slog.Default()).
	Logger *slog.Logger
	// Console is quoted when the guest never becomes ready.
	Console *Console
	// Ready tunes the readiness wait (its Done is set by Serve).
	Ready ReadyOptions
	// StopTimeout is how long the guest may take to drain and power off
	// on shutdown before it is killed (default 45s: the guest drains
	// running calls for up to 30s by default).
	StopTimeout time.Duration
	// OnReady is called once the guest answers, with the boot-to-ready
	// time (e.g. to print how to use the server).
	OnReady func(took time.Duration)
}

// Serve runs m behind l: it boots the VM, waits until the guest's server
// answers a health check, then proxies every connection accepted on l to
// the guest (see Proxy) until ctx ends or the VM dies.
//
// When ctx ends (serve-vm got SIGINT or SIGTERM), Serve stops accepting,
// asks the guest to power off (the guest's server drains: it sends GOAWAY
// on every connection and lets running calls finish), waits up to
// StopTimeout, kills the VM if needed, closes what is left and returns
// nil. When the VM dies or the guest never becomes ready, Serve returns
// an error quoting the console's tail (an *ExitError when the VM ended),
// and serve-vm exits non-zero.
func Serve(ctx context.Context, m Machine, l net.Listener, o ServeOptions) error {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 45 * time.Second
	}
	defer l.Close()
	if err := m.Start(ctx); err != nil {
		return err
	}
	waitc := make(chan error, 1)
	ended := make(chan struct{})
	go func() {
		waitc <- m.Wait()
		close(ended)
	}()
	stop := func(why string) error {
		log.Info("stopping the vm", "why", why, "timeout", o.StopTimeout)
		sctx, cancel := context.WithTimeout(context.Background(), o.StopTimeout)
		defer cancel()
		t := time.Now()
		err := m.Stop(sctx)
		if werr := <-waitc; werr != nil {
			log.Warn("the vm did not end cleanly", "err", werr)
		}
		if err == nil {
			log.Info("vm stopped", "took", time.Since(t).Round(time.Millisecond))
		}
		return err
	}

	ro := o.Ready
	ro.Done = ended
	took, err := WaitReady(ctx, m.DialGuest, ro)
	if err != nil {
		select {
		case <-ended:
			return fmt.Errorf("%w (while waiting for the guest: %v)", <-waitc, err)
		default:
		}
		if ctx.Err() != nil {
			return stop("interrupted during boot")
		}
		if r, ok := m.(CPUReporter); ok {
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if st, cerr := r.CPUState(cctx); cerr == nil && st != "" {
				err = fmt.Errorf("%w; vCPUs: %s", err, st)
			}
			cancel()
		}
		if o.Console != nil {
			if tail := o.Console.Tail(ConsoleTailLines); tail != "" {
				err = fmt.Errorf("%w; console tail:\n%s", err, tail)
			}
		}
		return errors.Join(err, stop("not ready"))
	}
	log.Info("guest ready", "boot_to_ready", took.Round(time.Millisecond))
	if o.OnReady != nil {
		o.OnReady(took)
	}

	p := &Proxy{Dial: m.DialGuest, Logger: log}
	servec := make(chan error, 1)
	go func() { servec <- p.Serve(l) }()
	select {
	case <-ctx.Done():
		p.StopAccepting()
		err := stop("shutdown requested")
		p.Close()
		st := p.Stats()
		log.Info("proxy closed", "connections", st.Accepted, "failed", st.Failed)
		return err
	case err := <-waitc:
		p.Close()
		if err == nil {
			err = errors.New("vm ended")
		}
		return err
	case err := <-servec:
		if err == nil {
			err = errors.New("listener closed")
		}
		err = fmt.Errorf("accept client connections: %w", err)
		return errors.Join(err, stop("listener failed"), p.Close())
	}
}
