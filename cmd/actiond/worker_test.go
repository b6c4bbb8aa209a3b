package main

import "testing"

func TestPlatformFlagSorts(t *testing.T) {
	var f platformFlag
	for _, v := range []string{"OSFamily=linux", "ISA=x86-64", "OSFamily=Linux", "empty="} {
		if err := f.Set(v); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Set("novalue"); err == nil {
		t.Error("Set accepted a property without '='")
	}
	var got []string
	for _, p := range f.platform().Properties {
		got = append(got, p.Name+"="+p.Value)
	}
	want := []string{"ISA=x86-64", "OSFamily=Linux", "OSFamily=linux", "empty="}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

func TestRunWorkerFlags(t *testing.T) {
	if err := runWorker([]string{"--cas=127.0.0.1:1"}); err == nil {
		t.Error("runWorker without --scheduler succeeded")
	}
	if err := runWorker([]string{"--scheduler=a:1", "--cas=b:1", "--platform=bad"}); err == nil {
		t.Error("runWorker accepted --platform=bad")
	}
}
