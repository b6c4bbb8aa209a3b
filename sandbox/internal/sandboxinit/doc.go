// Package sandboxinit is the init process of the actiond sandbox: the code
// that runs inside the new namespaces, builds the action's root, drops
// privileges and starts the command.
//
// It lives in its own package with few dependencies because Go initialises
// packages in dependency order and then by import path: the helper's init
// function runs before the heavy packages a full binary links (gRPC,
// protobuf), so none of their initialisation runs in, or delays, every
// sandbox. Only package sandbox should import it.
package sandboxinit
