package lru

import (
	"slices"
	"testing"
)

// keys lists the keys from the least to the most recently used.
func keys(c *Cache[string, int]) []string {
	var ks []string
	for k := range c.Oldest() {
		ks = append(ks, k)
	}
	return ks
}

func TestOrderAndCost(t *testing.T) {
	var c Cache[string, int]
	if c.Len() != 0 || c.Cost() != 0 || keys(&c) != nil {
		t.Fatalf("zero cache: len %d cost %d keys %v", c.Len(), c.Cost(), keys(&c))
	}
	if _, ok := c.Get("a"); ok {
		t.Fatal("Get on an empty cache found something")
	}
	c.Add("a", 1, 10)
	c.Add("b", 2, 20)
	c.Add("c", 3, 30)
	if got, want := keys(&c), []string{"a", "b", "c"}; !slices.Equal(got, want) {
		t.Fatalf("order %v, want %v", got, want)
	}
	if v, ok := c.Get("a"); !ok || v != 1 {
		t.Fatalf("Get(a) = %d, %v", v, ok)
	}
	if got, want := keys(&c), []string{"b", "c", "a"}; !slices.Equal(got, want) {
		t.Fatalf("after Get(a): order %v, want %v", got, want)
	}
	if !c.Contains("b") || c.Contains("z") {
		t.Fatal("Contains is wrong")
	}
	if got, want := keys(&c), []string{"b", "c", "a"}; !slices.Equal(got, want) {
		t.Fatalf("Contains changed the order: %v, want %v", got, want)
	}
	// Replacing a value moves it to the front and adjusts the cost.
	c.Add("b", 4, 5)
	if got, want := keys(&c), []string{"c", "a", "b"}; !slices.Equal(got, want) {
		t.Fatalf("after re-Add(b): order %v, want %v", got, want)
	}
	if c.Len() != 3 || c.Cost() != 45 {
		t.Fatalf("len %d cost %d, want 3 and 45", c.Len(), c.Cost())
	}
	if v, ok := c.Remove("a"); !ok || v != 1 {
		t.Fatalf("Remove(a) = %d, %v", v, ok)
	}
	if _, ok := c.Remove("a"); ok {
		t.Fatal("Remove(a) twice found it twice")
	}
	if c.Len() != 2 || c.Cost() != 35 {
		t.Fatalf("after Remove: len %d cost %d, want 2 and 35", c.Len(), c.Cost())
	}
	k, v, ok := c.RemoveOldest()
	if !ok || k != "c" || v != 3 {
		t.Fatalf("RemoveOldest = %q, %d, %v; want c, 3, true", k, v, ok)
	}
	c.RemoveOldest()
	if _, _, ok := c.RemoveOldest(); ok || c.Len() != 0 || c.Cost() != 0 {
		t.Fatalf("emptied cache: RemoveOldest ok %v, len %d, cost %d", ok, c.Len(), c.Cost())
	}
}

func TestTrimTo(t *testing.T) {
	var c Cache[string, int]
	for i, k := range []string{"a", "b", "c", "d"} {
		c.Add(k, i, 10)
	}
	c.Get("a")
	var evicted []string
	c.TrimTo(25, func(k string, _ int) { evicted = append(evicted, k) })
	if want := []string{"b", "c"}; !slices.Equal(evicted, want) {
		t.Fatalf("evicted %v, want %v", evicted, want)
	}
	if got, want := keys(&c), []string{"d", "a"}; !slices.Equal(got, want) || c.Cost() != 20 {
		t.Fatalf("left %v (cost %d), want %v (cost 20)", got, c.Cost(), want)
	}
	c.TrimTo(100, nil) // under the bound: nothing happens
	if c.Len() != 2 {
		t.Fatalf("TrimTo above the cost evicted: len %d", c.Len())
	}
	c.TrimTo(0, nil)
	if c.Len() != 0 || c.Cost() != 0 {
		t.Fatalf("TrimTo(0): len %d cost %d", c.Len(), c.Cost())
	}
	// Zero-cost entries never push the cost over a bound of zero.
	c.Add("free", 0, 0)
	c.TrimTo(0, nil)
	if !c.Contains("free") {
		t.Fatal("TrimTo(0) evicted a zero-cost entry")
	}
}

func TestAdmit(t *testing.T) {
	var c Cache[string, int]
	if !c.Admit("a", 1, 4, 10) || !c.Admit("b", 2, 4, 10) {
		t.Fatal("Admit refused entries that fit")
	}
	if c.Admit("a", 9, 1, 10) {
		t.Fatal("Admit replaced an entry that was there")
	}
	if v, _ := c.Get("b"); v != 2 {
		t.Fatalf("b = %d", v)
	}
	if got, want := keys(&c), []string{"a", "b"}; !slices.Equal(got, want) {
		t.Fatalf("order %v, want %v (Admit of a present key must not mark it used)", got, want)
	}
	if c.Admit("huge", 3, 11, 10) || c.Contains("huge") || c.Len() != 2 {
		t.Fatal("Admit took an entry costing more than the bound")
	}
	if !c.Admit("c", 3, 4, 10) {
		t.Fatal("Admit refused c")
	}
	if got, want := keys(&c), []string{"b", "c"}; !slices.Equal(got, want) || c.Cost() != 8 {
		t.Fatalf("left %v (cost %d), want %v (cost 8)", got, c.Cost(), want)
	}
}

// A walk from the oldest may remove the entry it is given: how a cache
// evicts what it may while skipping what it must keep (pinned blobs).
func TestOldestRemovingAsItGoes(t *testing.T) {
	var c Cache[string, int]
	for i, k := range []string{"a", "b", "c", "d", "e"} {
		c.Add(k, i, 1)
	}
	for k, v := range c.Oldest() {
		if v%2 == 0 {
			c.Remove(k)
		}
	}
	if got, want := keys(&c), []string{"b", "d"}; !slices.Equal(got, want) {
		t.Fatalf("left %v, want %v", got, want)
	}
	n := 0
	for range c.Oldest() {
		n++
		break
	}
	if n != 1 {
		t.Fatalf("break did not stop the walk: %d", n)
	}
}
