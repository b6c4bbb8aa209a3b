package benchutil

import (
	"bufio"
	"os"
	"os/exec"
	"testing"
	"time"
)

// The test process's CPU as /proc reports it grows when it burns CPU.
func TestProcessCPU(t *testing.T) {
	before, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	x := 0
	for start := time.Now(); time.Since(start) < 200*time.Millisecond; x++ {
	}
	after, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after-before < 50*time.Millisecond {
		t.Errorf("200 ms of spinning counted as %v of CPU (%d loops)", after-before, x)
	}
}

// A child that is still running counts: a server's kept helpers are never
// reaped while it is measured.
func TestProcessCPUCountsLiveChildren(t *testing.T) {
	before, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// The child spins, then waits.
	cmd := startSpun(t, `i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done`)
	child, err := statCPU(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	after, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if child == 0 {
		t.Fatal("the child used no CPU that /proc shows; spin longer")
	}
	if after-before < child {
		t.Errorf("our CPU grew by %v while a live child used %v", after-before, child)
	}
}

// ServerCPU counts what a helper (our child) reaped from its commands as
// the commands' time, not the server's.
func TestServerCPUSplitsCommands(t *testing.T) {
	_, before, err := ServerCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// The "helper" runs a spinning "command", reaps it, then waits.
	cmd := startSpun(t, `sh -c 'i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done'`)
	_, reaped, err := statTimes(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if reaped == 0 {
		t.Fatal("the command used no CPU that /proc shows; spin longer")
	}
	_, after, err := ServerCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after-before < reaped {
		t.Errorf("commands' CPU grew by %v while the helper reaped %v", after-before, reaped)
	}
}

// startSpun starts a shell child that runs script, then waits for its
// stdin to close (at the test's end); it returns once script has run.
func startSpun(t *testing.T, script string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sh", "-c", script+"; echo spun; read x")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "spun\n" {
		t.Fatalf("child said %q, %v", line, err)
	}
	return cmd
}
