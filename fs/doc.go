// Package fs is actiondfs: input roots served straight from the CAS by a
// FUSE file system (github.com/jacobsa/fuse), so that staging an action's
// inputs costs the same for ten files as for a hundred thousand.
//
// A mount shows one input root digest. Directories are resolved lazily from
// REAPI Directory messages (from the executor's loaded InputTree when there
// is one, otherwise from the CAS through a bounded cache shared by all
// mounts) and file reads are served from the CAS blob files. Input entries
// never change, so the kernel may cache their entries and attributes for as
// long as the mount lives.
//
// Two modes:
//
//   - strict (the default): inputs are immutable. Opening an input for
//     writing, truncating it, changing its mode, owner or times, removing or
//     renaming it, or creating something over it fails with EROFS and is
//     recorded, so the executor can tell the user which file the command
//     tried to change and that mutates_inputs exists. New files and
//     directories may be created anywhere the caller has permission to,
//     including inside input directories; their bytes live in a per-action
//     stage directory on the CAS's file system, from which outputs move
//     into the CAS by rename (see Mount.OutputPath). Input directories keep
//     their entries but their own mode and owner may change (the executor
//     makes output directories mode 1777 and the sandbox chowns them).
//   - mutates_inputs: the tree is mounted read-only (with writable-looking
//     modes) as the lower layer of a stock overlayfs whose upper and work
//     directories are per action, so tools that rewrite inputs work and the
//     CAS is never touched.
//
// InputRoot implements executor.InputRoot and executor.OptionsInputRoot
// with one FUSE mount per action. Mounting needs root (mount(2) directly;
// fusermount is not used) and /dev/fuse; Available probes both.
package fs
