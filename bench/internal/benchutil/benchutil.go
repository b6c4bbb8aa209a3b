// Package benchutil holds what the benchmark programs under bench/ share:
// summary statistics, starting a private `actiond serve`, and JSON results.
package benchutil

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/actiond/actiond/internal/grpctest"
)

// Stats summarises one measured subject, in milliseconds.
type Stats struct {
	Name string  `json:"name"`
	N    int     `json:"n"`
	P50  float64 `json:"p50_ms"`
	P95  float64 `json:"p95_ms"`
	Mean float64 `json:"mean_ms"`
	Min  float64 `json:"min_ms"`
	Max  float64 `json:"max_ms"`
}

// ExecResult is the JSON output of execlatency (execlatency.json).
type ExecResult struct {
	Load      string  `json:"load_before"`
	Inputs    int     `json:"inputs"`
	InputRoot string  `json:"input_root,omitempty"`
	Subject   []Stats `json:"subjects"`
	Phases    []Stats `json:"actiond_phases"`
	// ServerCPUPerAction is the private server's CPU (its own, its
	// helpers' and the commands') per measured action, in ms.
	ServerCPUPerAction float64 `json:"server_cpu_ms_per_action,omitempty"`
	// ActiondCPUPerAction is the part of ServerCPUPerAction that is the
	// server's and its helpers' own, without the commands' (ms).
	ActiondCPUPerAction float64 `json:"actiond_cpu_ms_per_action,omitempty"`
}

// BazelResult is the JSON output of bazelbench (bazel.json, compile.json);
// durations in milliseconds.
type BazelResult struct {
	Load      string        `json:"load_before"`
	InputRoot string        `json:"input_root"`
	Genrules  []Measurement `json:"genrules,omitempty"`
	Stress    []Measurement `json:"stress,omitempty"`
	Compile   []Measurement `json:"compile,omitempty"`
	Wide      []Measurement `json:"wide,omitempty"`
}

// Measurement is one timed configuration of bazelbench.
type Measurement struct {
	Name     string    `json:"name"`
	Runs     []float64 `json:"runs_ms"`
	MedianMs float64   `json:"median_ms"`
	// PerActionMs is MedianMs / the number of actions, for the genrules.
	PerActionMs float64        `json:"per_action_ms,omitempty"`
	Processes   map[string]int `json:"processes,omitempty"`
	// ClientCPUMs and ServerCPUMs are the CPU of each run's Bazel server
	// (with the sandboxes and commands it reaps) and of the actiond server
	// (with its helpers and commands), where measured.
	ClientCPUMs []float64 `json:"client_cpu_ms,omitempty"`
	ServerCPUMs []float64 `json:"server_cpu_ms,omitempty"`
}

// Add records one timed run and the process counts it saw.
func (m *Measurement) Add(took time.Duration, processes map[string]int) {
	m.Runs = append(m.Runs, Ms(took))
	m.Processes = processes
}

// Summarise computes Stats over samples (nearest-rank percentiles).
func Summarise(name string, samples []time.Duration) Stats {
	if len(samples) == 0 {
		return Stats{Name: name}
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	var sum time.Duration
	for _, d := range s {
		sum += d
	}
	return Stats{
		Name: name, N: len(s),
		P50: Ms(Percentile(s, 0.50)), P95: Ms(Percentile(s, 0.95)),
		Mean: Ms(sum / time.Duration(len(s))), Min: Ms(s[0]), Max: Ms(s[len(s)-1]),
	}
}

// Percentile returns the nearest-rank p-quantile of sorted samples.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(p*float64(len(sorted))+0.999999) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// Median of samples (the lower middle for an even count).
func Median(samples []time.Duration) time.Duration {
	s := slices.Clone(samples)
	slices.Sort(s)
	return s[(len(s)-1)/2]
}

// Ms converts d to fractional milliseconds.
func Ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func (s Stats) String() string {
	return fmt.Sprintf("%-46s n=%-4d p50 %8.2f ms  p95 %8.2f ms  mean %8.2f ms  min %8.2f ms", s.Name, s.N, s.P50, s.P95, s.Mean, s.Min)
}

// WriteJSON writes v, indented, to path (nothing when path is empty).
func WriteJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// Server is an `actiond serve` process started by StartServer.
type Server struct {
	Addr string
	Root string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
}

// StartServer starts `bin serve --listen 127.0.0.1:PORT --root root args...`
// on a free port, logging to root/../<base>.log, and waits until its health
// service reports SERVING.
func StartServer(bin, root string, args ...string) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(root), 0o755); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(l.Addr().(*net.TCPAddr).Port))
	l.Close()
	logf, err := os.Create(root + ".log")
	if err != nil {
		return nil, err
	}
	argv := append([]string{"serve", "--listen", addr, "--root", root}, args...)
	cmd := exec.Command(bin, argv...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	s := &Server{Addr: addr, Root: root, cmd: cmd, log: logf, done: make(chan struct{})}
	go func() { cmd.Wait(); close(s.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-s.done:
			b, _ := os.ReadFile(logf.Name())
			return nil, fmt.Errorf("actiond exited during start-up:\n%s", b)
		default:
		}
		if err := checkServing(addr); err == nil {
			return s, nil
		} else if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("actiond not serving after 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// InputRoot is the input root strategy the server logged at start-up
// ("input_root=fuse"), or "?".
func (s *Server) InputRoot() string {
	b, _ := os.ReadFile(s.log.Name())
	if m := regexp.MustCompile(`input_root=(\S+)`).FindSubmatch(b); m != nil {
		return string(m[1])
	}
	return "?"
}

// Stop sends SIGTERM and waits (SIGKILL after 20 s).
func (s *Server) Stop() error {
	defer s.log.Close()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		return nil
	case <-time.After(20 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
		return errors.New("actiond did not stop on SIGTERM; killed")
	}
}

func checkServing(addr string) error { return grpctest.Serving(addr, time.Second) }

// Load reports the 1-minute load average (from /proc/loadavg), so that a
// result taken on a busy machine says so.
func Load() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	var l1 string
	fmt.Sscan(string(b), &l1)
	return l1
}
