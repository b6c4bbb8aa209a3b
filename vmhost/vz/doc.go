// Package vz is the macOS backend of vmhost: it runs the guest under Apple's
// Virtualization.framework (github.com/Code-Hex/vz/v3) with the Linux boot
// loader (raw arm64 Image, initramfs, command line), two virtio-blk disks
// (CAS read-write, runtimes read-only, identified by their
// blockDeviceIdentifier), a virtio-socket device (the host connects to the
// guest's vsock port), an entropy device, and a virtio console whose output
// is copied into a vmhost.Console.
//
// This package is deliberately thin: configuration, payloads, readiness,
// the proxy and the lifecycle live in package vmhost, where Linux tests
// cover them. On other systems New returns an error. The darwin build is
// type-checked on Linux by tools/darwincheck.
package vz
