// Package observe makes a running actiond server visible: Prometheus
// metrics (gRPC calls, CAS traffic and contents, ActionCache hit ratio,
// action queue and timings, input root strategy, VM state) and a small
// server-rendered status page, both on one HTTP handler.
//
// An Observer is created before the server (it is the executor's
// Options.Observer and provides the gRPC interceptors), then attached to
// the server once it exists:
//
//	obs := observe.New(observe.Options{})
//	opts.Observer, opts.GRPCOptions = obs, obs.ServerOptions()
//	srv, _ := actiond.New(opts)
//	obs.Attach(srv)
//	http.Serve(l, obs.Handler())
package observe

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// Options configure an Observer.
type Options struct {
	// Recent is how many finished actions the status page lists (default 50).
	Recent int
}

// Observer collects metrics and the state shown on the status page. It
// implements executor.Observer.
type Observer struct {
	opts    Options
	reg     *prometheus.Registry
	started time.Time

	grpcCalls    *prometheus.CounterVec
	grpcLatency  *prometheus.HistogramVec
	actions      *prometheus.CounterVec
	actionDur    prometheus.Histogram
	setupDur     prometheus.Histogram
	phaseDur     *prometheus.HistogramVec
	vmState      *prometheus.GaugeVec
	inputRootStr *prometheus.GaugeVec

	mu       sync.Mutex
	srv      *actiond.Server
	nextID   uint64
	running  map[uint64]*action
	finished []*action // ring, newest last
	vm       string
}

// New returns an Observer with the process-wide collectors registered.
func New(opts Options) *Observer {
	if opts.Recent <= 0 {
		opts.Recent = 50
	}
	o := &Observer{
		opts:    opts,
		reg:     prometheus.NewRegistry(),
		started: time.Now(),
		running: make(map[uint64]*action),
		grpcCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "actiond_grpc_requests_total", Help: "gRPC calls handled, by full method and status code.",
		}, []string{"method", "code"}),
		grpcLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "actiond_grpc_request_duration_seconds", Help: "gRPC call latency by full method (streams: until the handler returns).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"method"}),
		actions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "actiond_actions_total", Help: "Actions finished by the executor, by result: ok (exit 0), failed (non-zero exit), error (not run to completion) or cached.",
		}, []string{"result"}),
		actionDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "actiond_action_duration_seconds", Help: "Wall time of executed actions, from pick-up to response (excluding queueing).",
			Buckets: prometheus.ExponentialBuckets(0.005, 2.5, 12),
		}),
		setupDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "actiond_action_sandbox_setup_seconds", Help: "Time to materialise an action's input root and output directories.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 3, 12),
		}),
		phaseDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "actiond_action_phase_seconds", Help: "Time executed actions spent per phase: queued, inputs, execution, outputs.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 3, 14),
		}, []string{"phase"}),
		vmState: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "actiond_vm_state", Help: "1 for the VM's current state in serve-vm mode (e.g. starting, running, stopped).",
		}, []string{"state"}),
		inputRootStr: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "actiond_input_root_strategy", Help: "1 for the input root strategy in use (fuse, hardlink, copy).",
		}, []string{"strategy"}),
	}
	o.reg.MustRegister(o.grpcCalls, o.grpcLatency, o.actions, o.actionDur, o.setupDur, o.phaseDur, o.vmState, o.inputRootStr,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	bi := buildInfo()
	o.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "actiond_build_info", Help: "Always 1; labels carry the version.",
		ConstLabels: prometheus.Labels{"version": bi.Version, "go_version": bi.GoVersion, "revision": bi.Revision},
	}, func() float64 { return 1 }))
	return o
}

// Registry is where the metrics live, to add more or gather them in tests.
func (o *Observer) Registry() *prometheus.Registry { return o.reg }

// Attach registers the metrics read from srv (CAS contents and traffic,
// ActionCache lookups, queue) and shows srv on the status page. Call it
// once.
func (o *Observer) Attach(srv *actiond.Server) {
	o.mu.Lock()
	o.srv = srv
	o.mu.Unlock()
	gauge := func(name, help string, f func() float64) {
		o.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	counter := func(name, help string, f func() float64) {
		o.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, f))
	}
	counters := srv.CASCounters()
	counter("actiond_cas_received_bytes_total", "Blob bytes uploaded to the CAS (ByteStream Write, BatchUpdateBlobs).", func() float64 { in, _ := counters.Snapshot(); return float64(in) })
	counter("actiond_cas_sent_bytes_total", "Blob bytes served from the CAS (ByteStream Read, BatchReadBlobs).", func() float64 { _, out := counters.Snapshot(); return float64(out) })
	if disk := srv.DiskStore; disk != nil { // nil when Options.Store replaced it
		gauge("actiond_cas_blobs", "Blobs stored.", func() float64 { return float64(disk.Stats().Blobs) })
		gauge("actiond_cas_stored_bytes", "Bytes of blobs stored.", func() float64 { return float64(disk.Stats().Bytes) })
		gauge("actiond_cas_max_bytes", "CAS size limit (0: unlimited).", func() float64 { return float64(disk.Stats().MaxBytes) })
		gauge("actiond_cas_packs", "Pack files holding small blobs (see docs/guide.md, Small blobs live in packs).", func() float64 { return float64(disk.Stats().Packs) })
		gauge("actiond_cas_pack_dead_bytes", "Bytes of pack records no blob uses any more (evicted or replaced), until compaction reclaims them.", func() float64 { return float64(disk.Stats().PackDeadBytes) })
		counter("actiond_cas_evictions_total", "Blobs evicted to stay under the size limit.", func() float64 { return float64(disk.Stats().Evictions) })
		counter("actiond_cas_quarantined_total", "Blobs found not to match their digest (on a read, before use as an input, or by the scrubber) and moved to cas/quarantine; clients upload them again.", func() float64 { return float64(disk.Stats().Quarantined) })
		counter("actiond_cas_sync_rounds_total", "syncfs calls made by group commit (--durability=group) or by the write-back flusher (--durability=writeback).", func() float64 { return float64(disk.Stats().SyncRounds) })
		counter("actiond_cas_sync_waits_total", "Durability waits (a blob's bytes, or its name) served by those syncfs calls; waits per round is how much each flush is shared.", func() float64 { return float64(disk.Stats().SyncWaits) })
		counter("actiond_cas_scrubbed_bytes_total", "Bytes the background scrubber has re-hashed.", func() float64 { return float64(disk.ScrubStats().Bytes) })
		counter("actiond_cas_scrub_passes_total", "Completed scrubber passes over every blob.", func() float64 { return float64(disk.ScrubStats().Passes) })
	}
	if ac := srv.Cache; ac != nil { // nil when Options.Cache replaced the bbolt cache (a farm worker's is the farm's)
		counter("actiond_ac_hits_total", "ActionCache lookups that found a complete result.", func() float64 { return float64(ac.Stats().Hits) })
		counter("actiond_ac_misses_total", "ActionCache lookups that found nothing usable.", func() float64 { return float64(ac.Stats().Misses) })
		gauge("actiond_ac_hit_ratio", "ActionCache hits / lookups since start (0 before any lookup).", func() float64 { return hitRatio(ac.Stats().Hits, ac.Stats().Misses) })
		gauge("actiond_ac_entries", "ActionResults stored.", func() float64 { return float64(ac.Stats().Entries) })
		counter("actiond_ac_behind_results_total", "Results of executed actions recorded behind their Execute response.", func() float64 { return float64(ac.Stats().BehindResults) })
		counter("actiond_ac_behind_commits_total", "Transactions that committed those results; results per commit is how much each commit was shared.", func() float64 { return float64(ac.Stats().BehindCommits) })
	}
	if srv.Execution != nil {
		gauge("actiond_actions_queued", "Actions waiting for a free slot.", func() float64 { q, _ := srv.Execution.Load(); return float64(q) })
		gauge("actiond_actions_running", "Actions running.", func() float64 { _, r := srv.Execution.Load(); return float64(r) })
		gauge("actiond_actions_concurrency", "Actions that may run at once.", func() float64 { return float64(srv.Execution.Concurrency()) })
		o.inputRootStr.WithLabelValues(srv.InputRootName()).Set(1)
	}
}

func hitRatio(hits, misses int64) float64 {
	if hits+misses == 0 {
		return 0
	}
	return float64(hits) / float64(hits+misses)
}

// SetVMState records the VM's state (serve-vm): the gauge for state is 1,
// every other state seen so far 0.
func (o *Observer) SetVMState(state string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.vm != "" && o.vm != state {
		o.vmState.WithLabelValues(o.vm).Set(0)
	}
	o.vm = state
	o.vmState.WithLabelValues(state).Set(1)
}

// Handler serves /metrics (Prometheus text format) and / (status page).
func (o *Observer) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(o.reg, promhttp.HandlerOpts{Registry: o.reg}))
	mux.HandleFunc("GET /{$}", o.serveStatus)
	return mux
}

// ServerOptions are the gRPC interceptors that count and time every call.
func (o *Observer) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(o.UnaryInterceptor),
		grpc.ChainStreamInterceptor(o.StreamInterceptor),
	}
}

// UnaryInterceptor counts and times unary calls.
func (o *Observer) UnaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	o.observeCall(info.FullMethod, start, err)
	return resp, err
}

// StreamInterceptor counts and times streaming calls.
func (o *Observer) StreamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	err := handler(srv, ss)
	o.observeCall(info.FullMethod, start, err)
	return err
}

func (o *Observer) observeCall(method string, start time.Time, err error) {
	o.grpcCalls.WithLabelValues(method, status.Code(err).String()).Inc()
	o.grpcLatency.WithLabelValues(method).Observe(time.Since(start).Seconds())
}

// action is one action as the status page shows it.
type action struct {
	o       *Observer
	id      uint64
	digest  cas.Digest
	queued  time.Time
	started time.Time

	// guarded by o.mu
	args    []string
	runtime string
	stage   executor.Stage
	end     time.Time
	resp    *repb.ExecuteResponse
}

// ActionStarted implements executor.Observer.
func (o *Observer) ActionStarted(d cas.Digest, queued time.Time) executor.ActionObserver {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.nextID++
	a := &action{o: o, id: o.nextID, digest: d, queued: queued, started: time.Now()}
	o.running[a.id] = a
	return a
}

func (a *action) Command(args []string, runtime string) {
	a.o.mu.Lock()
	defer a.o.mu.Unlock()
	a.args = append([]string(nil), args...)
	a.runtime = runtime
}

func (a *action) Stage(s executor.Stage) {
	a.o.mu.Lock()
	defer a.o.mu.Unlock()
	a.stage = s
}

func (a *action) Finished(resp *repb.ExecuteResponse) {
	o := a.o
	now := time.Now()
	o.mu.Lock()
	a.end, a.resp = now, resp
	delete(o.running, a.id)
	o.finished = append(o.finished, a)
	if len(o.finished) > o.opts.Recent {
		o.finished = append(o.finished[:0:0], o.finished[len(o.finished)-o.opts.Recent:]...)
	}
	o.mu.Unlock()

	switch {
	case resp.GetCachedResult():
		o.actions.WithLabelValues("cached").Inc()
		return
	case resp.GetStatus().GetCode() != 0 || resp.GetResult() == nil:
		o.actions.WithLabelValues("error").Inc()
	case resp.Result.ExitCode != 0:
		o.actions.WithLabelValues("failed").Inc()
	default:
		o.actions.WithLabelValues("ok").Inc()
	}
	o.actionDur.Observe(now.Sub(a.started).Seconds())
	p := phasesOf(resp)
	if p.Inputs > 0 {
		o.setupDur.Observe(p.Inputs.Seconds())
	}
	if resp.GetResult() != nil {
		o.phaseDur.WithLabelValues("queued").Observe(p.Queued.Seconds())
		o.phaseDur.WithLabelValues("inputs").Observe(p.Inputs.Seconds())
		o.phaseDur.WithLabelValues("execution").Observe(p.Execution.Seconds())
		o.phaseDur.WithLabelValues("outputs").Observe(p.Outputs.Seconds())
	}
}

// Phases is the time an action spent in each phase, from its
// ExecutedActionMetadata.
type Phases struct{ Queued, Inputs, Execution, Outputs time.Duration }

func phasesOf(resp *repb.ExecuteResponse) Phases {
	md := resp.GetResult().GetExecutionMetadata()
	if md == nil {
		return Phases{}
	}
	span := func(a, b interface{ AsTime() time.Time }, ok bool) time.Duration {
		if !ok {
			return 0
		}
		if d := b.AsTime().Sub(a.AsTime()); d > 0 {
			return d
		}
		return 0
	}
	return Phases{
		Queued:    span(md.QueuedTimestamp, md.WorkerStartTimestamp, md.QueuedTimestamp != nil && md.WorkerStartTimestamp != nil),
		Inputs:    span(md.InputFetchStartTimestamp, md.InputFetchCompletedTimestamp, md.InputFetchStartTimestamp != nil && md.InputFetchCompletedTimestamp != nil),
		Execution: span(md.ExecutionStartTimestamp, md.ExecutionCompletedTimestamp, md.ExecutionStartTimestamp != nil && md.ExecutionCompletedTimestamp != nil),
		Outputs:   span(md.OutputUploadStartTimestamp, md.OutputUploadCompletedTimestamp, md.OutputUploadStartTimestamp != nil && md.OutputUploadCompletedTimestamp != nil),
	}
}
