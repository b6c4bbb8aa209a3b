package sandbox

import (
	"errors"
	"slices"
	"testing"
)

func TestOverlaps(t *testing.T) {
	files := map[string]string{
		"/etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/x\nin:x:5005:100::/:/x\n",
		"/etc/group":  "root:x:0:\n# comment\ng:x:4999:\n",
		"/etc/subuid": "alice:100000:65536\nbob:4990:11\n",
	}
	read := func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, errors.New("no such file")
	}
	got := overlaps(IDRange{First: 5000, Count: 10}, read)
	want := []string{"/etc/passwd: in", "/etc/subuid: bob"}
	if !slices.Equal(got, want) {
		t.Errorf("overlaps = %q; want %q", got, want)
	}
	if got := overlaps(DefaultIDs, read); len(got) != 0 {
		t.Errorf("default range overlaps %q", got)
	}
}
