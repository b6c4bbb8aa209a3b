package vmhost

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Step is one named stage of starting a machine. Backends describe start-up
// as an ordered list of steps (after firecracker-go-sdk's handler lists), so
// the log says how long each took and an error names the stage that failed.
type Step struct {
	Name string
	Run  func(ctx context.Context) error
}

// RunSteps runs steps in order, stopping at the first error, which it
// returns wrapped with the step's name. Each step's duration is logged at
// debug level.
func RunSteps(ctx context.Context, log *slog.Logger, steps []Step) error {
	if log == nil {
		log = slog.Default()
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%s: %w", s.Name, err)
		}
		t := time.Now()
		if err := s.Run(ctx); err != nil {
			log.Debug("vm start step failed", "step", s.Name, "took", time.Since(t).Round(time.Microsecond), "err", err)
			return fmt.Errorf("%s: %w", s.Name, err)
		}
		log.Debug("vm start step", "step", s.Name, "took", time.Since(t).Round(time.Microsecond))
	}
	return nil
}

// Cleanups collects what start-up acquired (processes, sockets, temporary
// directories) so that a failed start and a stopped machine release it all,
// last acquired first. It is safe for concurrent use; Run runs each cleanup
// once.
type Cleanups struct {
	mu  sync.Mutex
	fns []cleanup
}

type cleanup struct {
	name string
	fn   func() error
}

// Add registers fn under name.
func (c *Cleanups) Add(name string, fn func() error) {
	c.mu.Lock()
	c.fns = append(c.fns, cleanup{name, fn})
	c.mu.Unlock()
}

// Run runs the cleanups registered so far in reverse order and forgets
// them. It returns their errors joined, each prefixed with its name.
func (c *Cleanups) Run() error {
	c.mu.Lock()
	fns := c.fns
	c.fns = nil
	c.mu.Unlock()
	var errs []error
	for i := len(fns) - 1; i >= 0; i-- {
		if err := fns[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", fns[i].name, err))
		}
	}
	return errors.Join(errs...)
}
