//go:build actiond_standalone

package payload

import "embed"

// files holds the staged payload: manifest.json and <name>.zst files.
//
//go:embed files/manifest.json files/*.zst
var files embed.FS

const embedded = true
