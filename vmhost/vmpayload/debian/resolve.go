package debian

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// Resolution is the package set of a first stage.
type Resolution struct {
	// Packages in dependency order: each package comes after what it
	// (Pre-)Depends on, where cycles allow.
	Packages []*Package
	// Notes records what was chosen how (alternatives, virtual packages,
	// ignored version constraints), for the log.
	Notes []string
}

// Resolve picks what debootstrap's first stage would: every package of
// Priority required, plus extra (each entry a package name or
// alternatives "gawk|mawk"), closed over Depends and Pre-Depends. An
// alternative already chosen wins; else the first that exists, as a real
// package or through Provides. Version constraints are not checked (one
// version per package is in a suite's index); Recommends are not followed.
func Resolve(idx *Index, extra []string) (*Resolution, error) {
	r := &resolver{idx: idx, chosen: map[string]*Package{}, res: &Resolution{}}
	for _, name := range idx.order {
		if p := idx.Packages[name]; p.Priority == "required" {
			r.add(p)
		}
	}
	for _, e := range extra {
		if err := r.relation(strings.ReplaceAll(e, "|", " | "), "asked"); err != nil {
			return nil, err
		}
	}
	// Close over dependencies; the set only grows, so a worklist ends.
	for i := 0; i < len(r.list); i++ {
		p := r.list[i]
		for _, field := range []string{p.PreDepends, p.Depends} {
			for _, rel := range splitList(field) {
				if err := r.relation(rel, p.Name); err != nil {
					return nil, err
				}
			}
		}
	}
	r.res.Packages = r.order()
	return r.res, nil
}

type resolver struct {
	idx    *Index
	chosen map[string]*Package
	list   []*Package
	res    *Resolution
}

func (r *resolver) add(p *Package) {
	if _, ok := r.chosen[p.Name]; ok {
		return
	}
	r.chosen[p.Name] = p
	r.list = append(r.list, p)
}

// satisfied tells whether a chosen package is name or provides it.
func (r *resolver) satisfied(name string) bool {
	if _, ok := r.chosen[name]; ok {
		return true
	}
	for _, p := range r.idx.Provides[name] {
		if _, ok := r.chosen[p.Name]; ok {
			return true
		}
	}
	return false
}

// candidate returns the package that would satisfy name: the real
// package, else a provider (one already chosen, else of the highest
// priority, else the first in the index).
func (r *resolver) candidate(name string) (*Package, string) {
	if p, ok := r.idx.Packages[name]; ok {
		return p, ""
	}
	provs := r.idx.Provides[name]
	if len(provs) == 0 {
		return nil, ""
	}
	best := provs[0]
	rank := map[string]int{"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}
	for _, p := range provs {
		if _, ok := r.chosen[p.Name]; ok {
			return p, "virtual " + name + " provided by " + p.Name + " (already chosen)"
		}
		if rp, ok := rank[p.Priority]; ok && rp < rank[best.Priority] {
			best = p
		}
	}
	return best, "virtual " + name + " provided by " + best.Name
}

func (r *resolver) relation(rel, from string) error {
	alts := strings.Split(rel, "|")
	var names []string
	for _, a := range alts {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		names = append(names, relName(a))
		if strings.Contains(a, "(") && from == "asked" {
			r.res.Notes = append(r.res.Notes, fmt.Sprintf("version constraint in %q not checked", a))
		}
	}
	for _, n := range names {
		if r.satisfied(n) {
			return nil
		}
	}
	for i, n := range names {
		p, note := r.candidate(n)
		if p == nil {
			continue
		}
		if note != "" {
			r.res.Notes = append(r.res.Notes, from+": "+note)
		}
		if len(names) > 1 && i > 0 {
			r.res.Notes = append(r.res.Notes, fmt.Sprintf("%s: %q: took %s (first available)", from, strings.TrimSpace(rel), p.Name))
		}
		r.add(p)
		return nil
	}
	return fmt.Errorf("%s depends on %q, which no package in the %s index satisfies", from, strings.TrimSpace(rel), r.idx.Arch)
}

// order sorts the chosen packages so that dependencies come first (a
// depth-first walk over Pre-Depends and Depends, names sorted for a
// stable result; a cycle is broken where it is found).
func (r *resolver) order() []*Package {
	names := slices.Sorted(maps.Keys(r.chosen))
	state := map[string]int{} // 0 new, 1 visiting, 2 done
	var out []*Package
	var visit func(p *Package)
	visit = func(p *Package) {
		if state[p.Name] != 0 {
			return
		}
		state[p.Name] = 1
		var deps []*Package
		for _, field := range []string{p.PreDepends, p.Depends} {
			for _, rel := range splitList(field) {
				for _, a := range strings.Split(rel, "|") {
					n := relName(a)
					if q, ok := r.chosen[n]; ok {
						deps = append(deps, q)
						break
					}
					found := false
					for _, q := range r.idx.Provides[n] {
						if _, ok := r.chosen[q.Name]; ok {
							deps = append(deps, q)
							found = true
							break
						}
					}
					if found {
						break
					}
				}
			}
		}
		for _, q := range deps {
			visit(q)
		}
		state[p.Name] = 2
		out = append(out, p)
	}
	for _, n := range names {
		visit(r.chosen[n])
	}
	return out
}
