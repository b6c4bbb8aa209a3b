// Package remoteworker is the generated Go code of Buildbarn's worker
// protocol (service buildbarn.remoteworker.OperationQueue), wire-compatible
// with bb_scheduler. Regenerate with gen.sh.
package remoteworker

//go:generate ./gen.sh
