package debian

import (
	"fmt"
	"strconv"
	"strings"
)

// Package is one stanza of a Packages index.
type Package struct {
	Name, Version, Arch, Priority, MultiArch string
	Filename                                 string // pool path relative to the mirror
	Size                                     int64
	SHA256                                   string
	Depends, PreDepends, Provides            string
	Para                                     Paragraph
}

// ID is name=version, as the payload manifest records packages.
func (p *Package) ID() string { return p.Name + "=" + p.Version }

// DebName is the package's file name in the cache.
func (p *Package) DebName() string {
	v := strings.ReplaceAll(p.Version, ":", "%3a")
	return p.Name + "_" + v + "_" + p.Arch + ".deb"
}

// Index is a parsed Packages file for one architecture.
type Index struct {
	Arch     string
	Packages map[string]*Package   // by name
	Provides map[string][]*Package // virtual name → providers, in index order
	order    []string
}

// ParseIndex parses a Packages file for arch (packages of other
// architectures than arch and "all" are ignored).
func ParseIndex(data []byte, arch string) (*Index, error) {
	paras, err := ParseParagraphs(data)
	if err != nil {
		return nil, fmt.Errorf("the Packages index: %w", err)
	}
	idx := &Index{Arch: arch, Packages: map[string]*Package{}, Provides: map[string][]*Package{}}
	for _, para := range paras {
		p := &Package{
			Name: para.Get("Package"), Version: para.Get("Version"), Arch: para.Get("Architecture"),
			Priority: para.Get("Priority"), MultiArch: para.Get("Multi-Arch"), Filename: para.Get("Filename"),
			SHA256: strings.ToLower(para.Get("SHA256")), Depends: para.Get("Depends"),
			PreDepends: para.Get("Pre-Depends"), Provides: para.Get("Provides"), Para: para,
		}
		if p.Name == "" || p.Filename == "" || p.SHA256 == "" {
			return nil, fmt.Errorf("the Packages index: stanza %q lacks Package, Filename or SHA256", p.Name)
		}
		if p.Arch != arch && p.Arch != "all" {
			continue
		}
		if p.Size, err = strconv.ParseInt(para.Get("Size"), 10, 64); err != nil {
			return nil, fmt.Errorf("the Packages index: %s: Size: %w", p.Name, err)
		}
		if prev, dup := idx.Packages[p.Name]; dup {
			// Several versions in one index (rare in a release suite):
			// keep the newer one, as apt would.
			if CompareVersions(p.Version, prev.Version) <= 0 {
				continue
			}
		} else {
			idx.order = append(idx.order, p.Name)
		}
		idx.Packages[p.Name] = p
	}
	for _, name := range idx.order {
		p := idx.Packages[name]
		for _, rel := range splitList(p.Provides) {
			v := relName(rel)
			idx.Provides[v] = append(idx.Provides[v], p)
		}
	}
	return idx, nil
}

// Names returns the package names in index order.
func (idx *Index) Names() []string { return append([]string(nil), idx.order...) }

// splitList splits a comma-separated relation field.
func splitList(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

// relName is the package name of a relation such as "libc6:any (>= 2.36)".
func relName(rel string) string {
	rel = strings.TrimSpace(rel)
	if i := strings.IndexAny(rel, " (["); i >= 0 {
		rel = rel[:i]
	}
	name, _, _ := strings.Cut(rel, ":")
	return name
}

// CompareVersions compares Debian versions ([epoch:]upstream[-revision])
// by dpkg's rules; it returns -1, 0 or 1.
func CompareVersions(a, b string) int {
	ea, ua, ra := splitVersion(a)
	eb, ub, rb := splitVersion(b)
	if ea != eb {
		if ea < eb {
			return -1
		}
		return 1
	}
	if c := compareFragment(ua, ub); c != 0 {
		return c
	}
	return compareFragment(ra, rb)
}

func splitVersion(v string) (int, string, string) {
	epoch := 0
	if e, rest, ok := strings.Cut(v, ":"); ok {
		epoch, _ = strconv.Atoi(e)
		v = rest
	}
	rev := ""
	if i := strings.LastIndex(v, "-"); i >= 0 {
		v, rev = v[:i], v[i+1:]
	}
	return epoch, v, rev
}

// order of a non-digit character in dpkg's comparison: ~ sorts before
// everything (even the end), letters before other characters.
func charOrder(c byte) int {
	switch {
	case c == '~':
		return -1
	case c >= '0' && c <= '9':
		return 0
	case (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'):
		return int(c)
	default:
		return int(c) + 256
	}
}

func compareFragment(a, b string) int {
	for a != "" || b != "" {
		// Non-digit prefix.
		for (a != "" && !isDigit(a[0])) || (b != "" && !isDigit(b[0])) {
			ca, cb := 0, 0
			if a != "" {
				ca = charOrder(a[0])
			}
			if b != "" {
				cb = charOrder(b[0])
			}
			if ca != cb {
				if ca < cb {
					return -1
				}
				return 1
			}
			a, b = a[1:], b[1:]
		}
		// Digit run.
		var na, nb string
		na, a = digitRun(a)
		nb, b = digitRun(b)
		na, nb = strings.TrimLeft(na, "0"), strings.TrimLeft(nb, "0")
		if len(na) != len(nb) {
			if len(na) < len(nb) {
				return -1
			}
			return 1
		}
		if na != nb {
			if na < nb {
				return -1
			}
			return 1
		}
	}
	return 0
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func digitRun(s string) (string, string) {
	i := 0
	for i < len(s) && isDigit(s[i]) {
		i++
	}
	return s[:i], s[i:]
}
