package executor

import (
	"time"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// Observer watches the actions an Executor runs, for metrics and status
// pages. It is optional (Options.Observer); its methods must be fast and
// safe for concurrent use.
type Observer interface {
	// ActionStarted is called when an action is picked up to run; the
	// returned ActionObserver (which may be nil) sees the rest of it.
	ActionStarted(action cas.Digest, queued time.Time) ActionObserver
}

// ActionObserver follows one action.
type ActionObserver interface {
	// Command is called when the action will run (not for cache hits),
	// with its arguments and the runtime it runs in.
	Command(args []string, runtime string)
	// Stage is called as the action moves between stages.
	Stage(Stage)
	// Finished is called with the response, always, last.
	Finished(*repb.ExecuteResponse)
}
