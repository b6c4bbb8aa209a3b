// Package examples holds small programs that embed actiond's packages:
// embed runs one action with an in-process executor (no gRPC), farmworker
// is a custom Buildbarn farm worker built on package worker, customsandbox
// serves REAPI with a Sandbox of its own (a policy decorator over the Linux
// sandbox: about 20 lines for the Sandbox, one actiond.New call to wire
// it). All need root on Linux (the sandbox uses namespaces, chroot and
// mounts).
package examples
