package sandbox

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/actiond/actiond/executor"
)

// userPool hands out the ids actions run as: the lowest one of the range
// not in use, so that the n-th action running at a time always gets the
// same uid. With a fixed id (Config.UID/GID) every action shares it.
type userPool struct {
	fixed *executor.User
	ids   IDRange

	mu    sync.Mutex
	used  []bool
	freed chan struct{} // closed (and replaced) when an id is released
}

func newUserPool(cfg Config) (*userPool, error) {
	if cfg.UID != 0 || cfg.GID != 0 {
		u := executor.User{UID: cfg.UID, GID: cfg.GID}
		if u.UID == 0 {
			u.UID = DefaultID
		}
		if u.GID == 0 {
			u.GID = DefaultID
		}
		if u.UID < 0 || u.GID < 0 || u.UID > maxID || u.GID > maxID {
			return nil, fmt.Errorf("invalid uid/gid %d/%d", u.UID, u.GID)
		}
		return &userPool{fixed: &u}, nil
	}
	ids := cfg.IDs
	if ids == (IDRange{}) {
		ids = DefaultIDs
	}
	if err := ids.check(); err != nil {
		return nil, err
	}
	return &userPool{ids: ids, used: make([]bool, ids.Count), freed: make(chan struct{})}, nil
}

func (p *userPool) String() string {
	if p.fixed != nil {
		return fmt.Sprintf("%d:%d (shared)", p.fixed.UID, p.fixed.GID)
	}
	return p.ids.String()
}

// acquire reserves an id, waiting until one is free or ctx ends.
func (p *userPool) acquire(ctx context.Context) (executor.User, func(), error) {
	if p.fixed != nil {
		return *p.fixed, func() {}, nil
	}
	for {
		p.mu.Lock()
		for i, used := range p.used {
			if !used {
				p.used[i] = true
				p.mu.Unlock()
				id := p.ids.First + i
				var once sync.Once
				return executor.User{UID: id, GID: id}, func() { once.Do(func() { p.release(i) }) }, nil
			}
		}
		freed := p.freed
		p.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return executor.User{}, nil, fmt.Errorf("waiting for one of the %d action uids (%s) to be free: %w", p.ids.Count, p.ids, ctx.Err())
		}
	}
}

func (p *userPool) release(i int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.used[i] = false
	close(p.freed)
	p.freed = make(chan struct{})
}

// hostIDFiles name the host's ids: users and groups (name:x:ID:...) and
// subordinate ranges (name:FIRST:COUNT).
var hostIDFiles = []struct {
	path  string
	field int  // the id's field (0-based)
	sub   bool // FIRST:COUNT
}{
	{"/etc/passwd", 2, false}, {"/etc/group", 2, false},
	{"/etc/subuid", 1, true}, {"/etc/subgid", 1, true},
}

// overlaps lists host users, groups and subordinate id ranges with ids in
// r, as "file: name"; an action with such an id could reach that user's
// files and processes.
func overlaps(r IDRange, read func(string) ([]byte, error)) []string {
	var found []string
	last := r.First + r.Count - 1
	for _, f := range hostIDFiles {
		data, err := read(f.path)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			fields := strings.Split(line, ":")
			if len(fields) <= f.field+1 || strings.HasPrefix(line, "#") {
				continue
			}
			lo, err := strconv.Atoi(fields[f.field])
			if err != nil {
				continue
			}
			hi := lo
			if f.sub {
				n, err := strconv.Atoi(fields[f.field+1])
				if err != nil || n < 1 {
					continue
				}
				hi = lo + n - 1
			}
			if lo <= last && hi >= r.First {
				found = append(found, f.path+": "+fields[0])
			}
		}
	}
	return found
}
