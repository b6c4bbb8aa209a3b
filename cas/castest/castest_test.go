package castest_test

import (
	"testing"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
)

func TestDiskStore(t *testing.T) {
	castest.TestStore(t, func(t *testing.T) cas.Store {
		s, err := cas.NewDiskStore(t.TempDir(), cas.WithFsync(false))
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestMemStore(t *testing.T) {
	castest.TestStore(t, func(t *testing.T) cas.Store { return castest.NewMemStore() })
}
