package main

import (
	"context"
	"testing"

	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/executor/executortest"
)

// TestCappedAppliesThePolicy: requests over the caps, and requests with no
// limit, run with the caps; smaller requests keep theirs.
func TestCappedAppliesThePolicy(t *testing.T) {
	var got []executor.Limits
	inner := &executortest.Sandbox{Func: func(ctx context.Context, spec *executor.RunSpec) (*executor.RunResult, error) {
		got = append(got, spec.Limits)
		return &executor.RunResult{}, nil
	}}
	c := capped{Sandbox: inner, memory: 2 << 30, pids: 512}
	for _, l := range []executor.Limits{{}, {MemoryBytes: 8 << 30, Pids: 100000}, {MemoryBytes: 64 << 20, Pids: 32}} {
		if _, err := c.Run(context.Background(), &executor.RunSpec{Runtime: "host", Limits: l}); err != nil {
			t.Fatal(err)
		}
	}
	want := []executor.Limits{{MemoryBytes: 2 << 30, Pids: 512}, {MemoryBytes: 2 << 30, Pids: 512}, {MemoryBytes: 64 << 20, Pids: 32}}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("run %d: the inner sandbox got %+v, want %+v", i, got[i], want[i])
		}
	}
	if rts := c.Runtimes(); len(rts) != 1 || rts[0] != "host" {
		t.Errorf("Runtimes() = %v: the decorator must pass the inner sandbox's through", rts)
	}
}
