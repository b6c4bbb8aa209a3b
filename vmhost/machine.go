package vmhost

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Machine is one guest VM. Backends: vmhost/qemu (Linux) and vmhost/vz
// (macOS).
type Machine interface {
	// Start boots the VM: it returns once the VM runs and its transport is
	// attached, not when the guest is ready (see WaitReady). On error,
	// everything Start acquired is released.
	Start(ctx context.Context) error
	// DialGuest opens a new byte stream to the guest's gRPC server. Streams
	// are independent; each proxied client connection gets its own.
	DialGuest(ctx context.Context) (net.Conn, error)
	// Wait blocks until the VM has ended and its resources are released. It
	// returns nil when the VM ended because Stop asked it to, and an
	// *ExitError (quoting the console's tail) otherwise.
	Wait() error
	// Stop asks the guest to power off (it drains, syncs and unmounts),
	// waits until ctx ends, then kills the VM. It returns once the VM has
	// ended; calling it again, or after the VM died, is harmless.
	Stop(ctx context.Context) error
}

// ErrNotStarted is returned by DialGuest and Stop before Start succeeded.
var ErrNotStarted = errors.New("vmhost: machine not started")

// ErrStopped is returned by DialGuest once the VM has ended.
var ErrStopped = errors.New("vmhost: machine stopped")

// ConsoleTailLines is how many console lines an ExitError quotes.
const ConsoleTailLines = 40

// ExitError says that a VM ended when nobody asked it to (or had to be
// killed), with the tail of its console.
type ExitError struct {
	// Err is why it ended, e.g. the VMM's exit status.
	Err error
	// Console is the console's tail (ConsoleTailLines lines).
	Console string
}

func (e *ExitError) Error() string {
	msg := "vm ended unexpectedly: " + e.Err.Error()
	if e.Console == "" {
		return msg + " (the console printed nothing)"
	}
	return msg + "; console tail:\n" + e.Console
}

func (e *ExitError) Unwrap() error { return e.Err }

// Exit tracks the end of a VM for a backend: the backend calls Exited once
// when the VMM process or framework reports the end, and Stopping before
// it asks the guest to stop. Wait and Done serve Machine.Wait.
type Exit struct {
	console  *Console
	done     chan struct{}
	once     sync.Once
	stopping atomic.Bool
	killed   atomic.Bool
	err      error
}

// NewExit returns an Exit whose errors quote console (may be nil).
func NewExit(console *Console) *Exit {
	return &Exit{console: console, done: make(chan struct{})}
}

// Stopping records that the host asked the VM to end: a clean end after it
// is not an error.
func (e *Exit) Stopping() { e.stopping.Store(true) }

// Killing records that the host is about to kill the VM because it did not
// power off in time: Wait reports that.
func (e *Exit) Killing() { e.killed.Store(true) }

// Exited records the end; err is the VMM's own status (nil for a clean
// exit). Only the first call counts.
func (e *Exit) Exited(err error) {
	e.once.Do(func() {
		switch {
		case e.killed.Load():
			e.err = e.exitError(fmt.Errorf("killed: the guest did not power off in time (%v)", orClean(err)))
		case e.stopping.Load():
			e.err = nil
		case err == nil:
			e.err = e.exitError(errors.New("the guest powered off or rebooted by itself (panic, failed boot or server exit)"))
		default:
			e.err = e.exitError(err)
		}
		close(e.done)
	})
}

func orClean(err error) any {
	if err == nil {
		return "exit status 0"
	}
	return err
}

func (e *Exit) exitError(err error) error {
	var tail string
	if e.console != nil {
		e.console.Flush()
		tail = e.console.Tail(ConsoleTailLines)
	}
	return &ExitError{Err: err, Console: tail}
}

// Done is closed when the VM has ended.
func (e *Exit) Done() <-chan struct{} { return e.done }

// Wait blocks until Exited and returns the verdict.
func (e *Exit) Wait() error {
	<-e.done
	return e.err
}

// Err returns the verdict once the VM has ended and nil before.
func (e *Exit) Err() error {
	select {
	case <-e.done:
		return e.err
	default:
		return nil
	}
}

// Ended reports whether the VM has ended.
func (e *Exit) Ended() bool {
	select {
	case <-e.done:
		return true
	default:
		return false
	}
}

// KillGrace is how long GracefulStop waits for the VM to end after kill.
const KillGrace = 10 * time.Second

// GracefulStop is the common shape of Machine.Stop: ask (a power-button
// press or similar; an error is logged by the caller and treated as "the
// guest will not stop by itself"), wait for e to end until ctx ends, then
// kill and wait up to KillGrace more.
func GracefulStop(ctx context.Context, e *Exit, ask func() error, kill func() error) error {
	if e.Ended() {
		return nil
	}
	e.Stopping()
	var askErr error
	if ask != nil {
		askErr = ask()
	}
	if askErr == nil {
		select {
		case <-e.Done():
			return nil
		case <-ctx.Done():
		}
	}
	if e.Ended() {
		return nil
	}
	e.Killing()
	if err := kill(); err != nil && !e.Ended() {
		return fmt.Errorf("kill vm: %w", err)
	}
	select {
	case <-e.Done():
	case <-time.After(KillGrace):
		return fmt.Errorf("vm still running %v after kill", KillGrace)
	}
	if askErr != nil {
		return fmt.Errorf("ask the guest to power off: %w (killed it instead)", askErr)
	}
	return nil
}

// CPUReporter is a Machine that can tell where its virtual CPUs are. Serve
// adds it to the error of a guest that did not become ready: a guest that
// hangs in its kernel (a livelock, both vCPUs busy at the same address) and
// one that waits (vCPUs halted) look the same from its console.
type CPUReporter interface {
	// CPUState describes each vCPU in one line: its program counter and,
	// where the architecture has them, privilege level and halted state.
	CPUState(ctx context.Context) (string, error)
}
