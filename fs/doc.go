// Package fs is actiondfs: input roots served straight from the CAS by a
// FUSE file system (github.com/jacobsa/fuse), so that staging an action's
// inputs costs the same for ten files as for a hundred thousand.
//
// A mount shows one input root digest. Directories are resolved lazily from
// REAPI Directory messages (from the executor's loaded InputTree when there
// is one, otherwise from the CAS through a bounded cache shared by all
// mounts) and file reads are served from the CAS blob files, kept open and
// shared by all mounts. Input entries never change, so the kernel may cache
// entries (negative ones too), attributes and pages for as long as the
// mount lives.
//
// Two modes:
//
//   - strict (the default): inputs are immutable. Opening an input for
//     writing, truncating it, changing its mode, owner or times, removing or
//     renaming it, or creating something over it fails with EROFS and is
//     recorded (Mount.Report), so the executor can tell the user which file
//     the command tried to change and that mutates_inputs exists. New files
//     and directories may be created wherever the caller has permission,
//     including inside input directories; their bytes live in a per-action
//     stage directory on the CAS's file system, from which outputs move
//     into the CAS by rename (Mount.OutputPath). Input directories keep
//     their entries but their own mode, owner and times may change (the
//     executor and the sandbox make output directories writable for the
//     action).
//   - mutates_inputs: the tree is mounted read-only, every input owned by
//     the sandbox user and writable, as the lower layer of a stock overlayfs
//     whose upper and work directories are per action, so tools that
//     rewrite inputs work and the CAS is never touched.
//
// The server checks permissions itself (no default_permissions), because
// requests that change inputs must reach it to be reported. FUSE_ACCESS is
// not implemented, so access(2) reports inputs as writable; opening them
// for writing still fails.
//
// Mounts are allow_other, so that the action's user can use them, but each
// serves only root and that user (MountOptions.User, StageOptions.User):
// anyone else gets EACCES, so other local users can neither read a tree
// nor leave entries in the kernel's caches. A spare serves only root until
// it gets its tree, and lets the kernel cache nothing until then: a name
// looked up in the empty tree must not stay "missing" once the tree has
// it. The state directory is private as well.
//
// InputRoot implements executor.InputRoot and executor.OptionsInputRoot
// with one FUSE mount per action: separate mounts keep actions' inodes,
// staged files and refusals apart. Mounting costs 0.2–2 ms (more on a busy
// machine, since the FUSE handshake needs this process scheduled), so a few
// strict mounts of the empty tree are made ahead of time (WithSpareMounts)
// and given their root when an action needs one: staging then takes
// microseconds; unmounting happens after the response (the executor cleans
// up in the background). Mounting needs root (mount(2) directly; fusermount
// is not used) and /dev/fuse; Available probes both.
//
// Every request an action makes is a round trip to this process, and on a
// machine whose cores are busy with the actions themselves the wait for
// this process to be scheduled is most of a round trip's cost. Quick
// requests are therefore answered on the goroutine that read them, FLUSH
// and FSYNC are refused once with ENOSYS (which makes the kernel stop
// sending them: writes are synchronous, and staged files are thrown away
// or moved into the CAS, which syncs what it keeps), and entries,
// attributes and pages of inputs are cached by the kernel for the mount's
// life. On Linux 6.11 and later, small inputs (up to 64 KiB) are stored
// whole in the kernel's page cache while their first OPEN is answered
// (FUSE_NOTIFY_STORE, see prefill.go), so reading one costs LOOKUP and
// OPEN but no READ; that is why this package mounts on a /dev/fuse
// descriptor of its own. With that,
// a build of 241 C compiles takes about 5% longer on actiondfs than on
// hardlinked inputs (BENCHMARKS.md).
//
// The process serving a mount must not map its files, and opens them only
// after the mount has made the kernel stop sending FUSE_POLL (see
// disablePoll): both could otherwise leave every Go P waiting for the
// server itself.
package fs
