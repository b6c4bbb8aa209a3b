// Package examples holds small programs that embed actiond's packages:
// embed runs one action with an in-process executor (no gRPC), farmworker
// is a custom Buildbarn farm worker built on package worker. Both need root
// on Linux (the sandbox uses namespaces, chroot and mounts).
package examples
