//go:build !actiond_standalone

package payload

import "embed"

var files embed.FS

const embedded = false
