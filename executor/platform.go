package executor

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/actiond/actiond/internal/units"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// Platform is what an action asks of its environment through platform
// properties (Action.platform, or Command.platform from older clients such
// as Bazel 4, where exec_properties end up).
type Platform struct {
	Runtime       string // "libc"
	MutatesInputs bool   // "mutates_inputs"
	Limits        Limits // "memory", "cpu", "pids"
	// Ignored lists property names this server does not interpret. Clients
	// often send properties meant for other backends (OSFamily,
	// container-image); they are ignored, never half-applied.
	Ignored []string
}

// PlatformProperties documents the properties actiond interprets.
var PlatformProperties = map[string]string{
	"libc":           `runtime to run in: "host" or a glibc runtime such as "glibc2.36"; unknown names are rejected`,
	"mutates_inputs": `"1"/"true" lets the action write its input files (off by default)`,
	"memory":         `memory limit, e.g. "512M", "2G"`,
	"cpu":            `CPU limit in cores, e.g. "1", "0.5"`,
	"pids":           `maximum number of processes and threads`,
	"tmp_size":       `size of the action's /tmp and of its /dev/shm (in memory), each, e.g. "256M"; at most the server's --sandbox-tmp-size`,
}

// ParsePlatform merges action and command platforms (the action's wins) and
// parses the properties actiond interprets.
func ParsePlatform(action, command *repb.Platform) (Platform, error) {
	props := map[string]string{}
	for _, pl := range []*repb.Platform{command, action} {
		if pl == nil {
			continue
		}
		for _, p := range pl.Properties {
			props[p.Name] = p.Value
		}
	}
	var out Platform
	for name, v := range props {
		switch name {
		case "libc":
			out.Runtime = v
		case "mutates_inputs":
			b, err := parseBool(v)
			if err != nil {
				return out, invalidf("platform property mutates_inputs=%q: %v", v, err)
			}
			out.MutatesInputs = b
		case "memory":
			n, err := units.ParseSize(v)
			if err != nil || n <= 0 {
				return out, invalidf("platform property memory=%q: want a positive size such as 512M or 2G", v)
			}
			out.Limits.MemoryBytes = n
		case "cpu":
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f <= 0 || f > 4096 {
				return out, invalidf("platform property cpu=%q: want a positive number of cores such as 1 or 0.5", v)
			}
			out.Limits.CPUMillis = int64(f * 1000)
		case "pids":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n <= 0 {
				return out, invalidf("platform property pids=%q: want a positive integer", v)
			}
			out.Limits.Pids = n
		case "tmp_size":
			n, err := units.ParseSize(v)
			if err != nil || n <= 0 {
				return out, invalidf("platform property tmp_size=%q: want a positive size such as 256M or 2G", v)
			}
			out.Limits.TmpBytes = n
		default:
			out.Ignored = append(out.Ignored, name)
		}
	}
	return out, nil
}

func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "1", "true", "yes", "on":
		return true, nil
	case "0", "false", "no", "off", "":
		return false, nil
	}
	return false, fmt.Errorf("want 1/true or 0/false")
}

func splitPath(p string) []string {
	var out []string
	for _, c := range strings.Split(p, "/") {
		if c != "" && c != "." {
			out = append(out, c)
		}
	}
	return out
}
