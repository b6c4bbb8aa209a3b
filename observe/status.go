package observe

import (
	"bytes"
	"context"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/actiond/actiond"
	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/units"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

// BuildInfo describes the running binary.
type BuildInfo struct {
	Version, GoVersion, Module, Revision, Time string
	Modified                                   bool
}

func buildInfo() BuildInfo {
	bi := BuildInfo{Version: actiond.Version, Revision: "unknown"}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return bi
	}
	bi.GoVersion, bi.Module = info.GoVersion, info.Main.Path
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			bi.Revision = s.Value
		case "vcs.time":
			bi.Time = s.Value
		case "vcs.modified":
			bi.Modified = s.Value == "true"
		}
	}
	return bi
}

type runningRow struct {
	What, Runtime, Stage, Action string
	Elapsed                      time.Duration
}

type finishedRow struct {
	What, Action, Result, Ended string
	Exit                        int32
	Cached, Failed              bool
	Total                       time.Duration
	Phases                      Phases
}

type statusData struct {
	Build                           BuildInfo
	Uptime                          time.Duration
	Execution                       bool
	InputRoot                       string
	Queued, Running, Concurrency    int
	RunningRows                     []runningRow
	QueuedRows                      []runningRow
	Finished                        []finishedRow
	Blobs                           int
	Stored, Limit                   string
	UsedPercent                     float64
	Evictions                       int64
	Hits, Misses, Entries           int64
	HitRatio                        float64
	BytesIn, BytesOut, VMState, Now string
	HasServer                       bool
	RecentLimit                     int
}

func stageName(s executor.Stage) string {
	switch s {
	case executor.StageCacheCheck:
		return "cache check"
	case executor.StageFetchingInputs:
		return "inputs"
	case executor.StageRunning:
		return "running"
	case executor.StageUploadingOutputs:
		return "outputs"
	}
	return "?"
}

// argvHead is a short description of a command: its first arguments.
func argvHead(args []string) string {
	if len(args) == 0 {
		return ""
	}
	s := strings.Join(args[:min(len(args), 4)], " ")
	if len(s) > 120 {
		s = s[:117] + "..."
	} else if len(args) > 4 {
		s += " ..."
	}
	return s
}

func (o *Observer) snapshot() statusData {
	now := time.Now()
	d := statusData{Build: buildInfo(), Uptime: now.Sub(o.started).Round(time.Second), Now: now.UTC().Format(time.RFC3339), RecentLimit: o.opts.Recent}
	o.mu.Lock()
	srv := o.srv
	d.VMState = o.vm
	for _, a := range o.running {
		what := argvHead(a.args)
		if what == "" {
			what = "(loading)"
		}
		d.RunningRows = append(d.RunningRows, runningRow{What: what, Runtime: a.runtime, Stage: stageName(a.stage), Action: a.digest.String(), Elapsed: now.Sub(a.started).Round(time.Millisecond)})
	}
	for i := len(o.finished) - 1; i >= 0; i-- {
		a := o.finished[i]
		r := finishedRow{What: argvHead(a.args), Action: a.digest.String(), Ended: a.end.UTC().Format("15:04:05"), Total: a.end.Sub(a.started).Round(time.Millisecond)}
		if r.What == "" {
			r.What = "(not run)"
		}
		r.Cached = a.resp.GetCachedResult()
		r.Exit = a.resp.GetResult().GetExitCode()
		if st := a.resp.GetStatus(); st.GetCode() != 0 {
			r.Result, r.Failed = fmt.Sprintf("error: %s", st.GetMessage()), true
		} else if r.Cached {
			r.Result = "cached"
		} else if r.Exit != 0 {
			r.Result, r.Failed = "failed", true
		} else {
			r.Result = "ok"
		}
		if !r.Cached {
			r.Phases = phasesOf(a.resp)
		}
		d.Finished = append(d.Finished, r)
	}
	o.mu.Unlock()
	slices.SortFunc(d.RunningRows, func(a, b runningRow) int { return int(b.Elapsed - a.Elapsed) })
	if srv == nil {
		return d
	}
	d.HasServer = true
	if srv.DiskStore != nil { // nil when Options.Store replaced it
		st := srv.DiskStore.Stats()
		d.Blobs, d.Stored, d.Evictions = st.Blobs, units.Format(st.Bytes), st.Evictions
		d.Limit = "unlimited"
		if st.MaxBytes > 0 {
			d.Limit = units.Format(st.MaxBytes)
			d.UsedPercent = 100 * float64(st.Bytes) / float64(st.MaxBytes)
		}
	}
	if srv.Cache != nil { // nil when Options.Cache replaced the bbolt cache
		ac := srv.Cache.Stats()
		d.Hits, d.Misses, d.Entries = ac.Hits, ac.Misses, int64(ac.Entries)
		d.HitRatio = 100 * hitRatio(ac.Hits, ac.Misses)
	}
	in, out := srv.CASCounters().Snapshot()
	d.BytesIn, d.BytesOut = units.Format(in), units.Format(out)
	if srv.Execution != nil {
		d.Execution = true
		d.Queued, d.Running = srv.Execution.Load()
		d.Concurrency = srv.Execution.Concurrency()
		d.InputRoot = srv.InputRootName()
		d.QueuedRows = queuedRows(srv, now)
	}
	return d
}

// maxQueuedRows bounds the queued actions the page lists (and loads).
const maxQueuedRows = 20

// queuedRows lists actions waiting for a slot, with their commands read
// from the CAS.
func queuedRows(srv *actiond.Server, now time.Time) []runningRow {
	var rows []runningRow
	for _, op := range srv.Execution.Operations() {
		if op.Stage != repb.ExecutionStage_QUEUED {
			continue
		}
		if len(rows) == maxQueuedRows {
			break
		}
		r := runningRow{What: "(unknown)", Action: op.Action.String(), Stage: "queued", Elapsed: now.Sub(op.Queued).Round(time.Millisecond)}
		if args, rt, err := describeAction(srv.Store, op.Action); err == nil {
			r.What, r.Runtime = argvHead(args), rt
		}
		rows = append(rows, r)
	}
	return rows
}

func describeAction(store cas.Store, d cas.Digest) ([]string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var action repb.Action
	var command repb.Command
	b, err := cas.ReadAll(ctx, store, d)
	if err != nil {
		return nil, "", err
	}
	if err := proto.Unmarshal(b, &action); err != nil {
		return nil, "", err
	}
	cd, err := cas.FromProto(action.CommandDigest)
	if err != nil {
		return nil, "", err
	}
	if b, err = cas.ReadAll(ctx, store, cd); err != nil {
		return nil, "", err
	}
	if err := proto.Unmarshal(b, &command); err != nil {
		return nil, "", err
	}
	rt := ""
	if p, err := executor.ParsePlatform(action.Platform, command.Platform); err == nil {
		rt = p.Runtime
	}
	return command.Arguments, rt, nil
}

func (o *Observer) serveStatus(w http.ResponseWriter, r *http.Request) {
	var buf bytes.Buffer
	if err := statusTmpl.Execute(&buf, o.snapshot()); err != nil {
		slog.Error("render status page", "err", err)
		http.Error(w, "render status page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Write(buf.Bytes())
}

func ms(d time.Duration) string {
	if d <= 0 {
		return "–"
	}
	if d < time.Second {
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	}
	return d.Round(10 * time.Millisecond).String()
}

var statusTmpl = template.Must(template.New("status").Funcs(template.FuncMap{"ms": ms}).Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>actiond {{.Build.Version}}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}td,th{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.92em}.bad{color:#b00}.muted{color:#777}
.bar{display:inline-block;width:12em;height:.8em;background:#eee;vertical-align:middle}.bar span{display:block;height:100%;background:#4a8}
</style>
</head>
<body>
<h1>actiond</h1>
<p class="muted">version <b id="version">{{.Build.Version}}</b> · {{.Build.GoVersion}} · revision {{.Build.Revision}}{{if .Build.Modified}} (modified){{end}}{{if .Build.Time}} · built {{.Build.Time}}{{end}} · up {{.Uptime}} · {{.Now}}</p>
{{if .VMState}}<p>VM state: <b id="vm-state">{{.VMState}}</b></p>{{end}}

<h2>Cache</h2>
{{if .HasServer}}
<table id="cache">
<tr><th>CAS stored</th><td class="n" id="cas-size">{{.Stored}}</td><td>of {{.Limit}}{{if .UsedPercent}} <span class="bar"><span style="width:{{printf "%.0f" .UsedPercent}}%"></span></span> {{printf "%.1f" .UsedPercent}}%{{end}}</td></tr>
<tr><th>CAS blobs</th><td class="n">{{.Blobs}}</td><td>{{.Evictions}} evicted since start</td></tr>
<tr><th>CAS traffic</th><td class="n">{{.BytesIn}} in</td><td>{{.BytesOut}} out</td></tr>
<tr><th>ActionCache</th><td class="n" id="hit-ratio">{{printf "%.1f" .HitRatio}}% hits</td><td>{{.Hits}} hits, {{.Misses}} misses, {{.Entries}} results stored</td></tr>
</table>
{{else}}<p class="muted">No server attached.</p>{{end}}

<h2>Actions</h2>
{{if .Execution}}
<p id="load">{{.Running}} running, {{.Queued}} queued (concurrency {{.Concurrency}}) · input root: <b id="input-root">{{.InputRoot}}</b></p>
<table id="running">
<tr><th>running</th><th>runtime</th><th>stage</th><th>elapsed</th><th>action</th></tr>
{{range .RunningRows}}<tr class="action"><td><code>{{.What}}</code></td><td>{{.Runtime}}</td><td>{{.Stage}}</td><td class="n">{{ms .Elapsed}}</td><td><code class="muted">{{.Action}}</code></td></tr>
{{else}}<tr><td colspan="5" class="muted">none</td></tr>
{{end}}</table>
{{if .QueuedRows}}
<table id="queued">
<tr><th>queued</th><th>runtime</th><th></th><th>waiting</th><th>action</th></tr>
{{range .QueuedRows}}<tr class="action"><td><code>{{.What}}</code></td><td>{{.Runtime}}</td><td>{{.Stage}}</td><td class="n">{{ms .Elapsed}}</td><td><code class="muted">{{.Action}}</code></td></tr>
{{end}}</table>
{{end}}

<h2>Last {{.RecentLimit}} finished</h2>
<table id="finished">
<tr><th>ended</th><th>command</th><th>result</th><th>exit</th><th>total</th><th>queued</th><th>inputs</th><th>execution</th><th>outputs</th></tr>
{{range .Finished}}<tr class="action"><td>{{.Ended}}</td><td><code>{{.What}}</code></td><td{{if .Failed}} class="bad"{{end}}>{{.Result}}</td><td class="n">{{.Exit}}</td><td class="n">{{ms .Total}}</td><td class="n">{{ms .Phases.Queued}}</td><td class="n">{{ms .Phases.Inputs}}</td><td class="n">{{ms .Phases.Execution}}</td><td class="n">{{ms .Phases.Outputs}}</td></tr>
{{else}}<tr><td colspan="9" class="muted">none yet</td></tr>
{{end}}</table>
{{else}}<p class="muted">Execution is disabled: this server is a cache only.</p>{{end}}
<p class="muted">Metrics: <a href="/metrics">/metrics</a></p>
</body>
</html>
`))
