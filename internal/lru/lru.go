// Package lru is the one least-recently-used list of actiond's caches: a map
// that remembers the order in which its entries were used and the total
// cost of what it holds, so that a cache can evict the oldest entries until
// it is under its bound (bytes, files, open descriptors...).
//
// A Cache decides nothing by itself: callers say what an entry costs, when
// to trim and what to do with what is evicted, since each cache bounds a
// different thing and some must skip entries (pinned blobs) while evicting.
// It is not safe for concurrent use: every cache that uses it already
// holds a lock of its own around the entry state it keeps beside it.
package lru

import (
	"container/list"
	"iter"
)

// Cache maps keys to values in order of use. The zero value is an empty
// cache ready to use; a Cache must not be copied after first use.
type Cache[K comparable, V any] struct {
	items map[K]*list.Element // of *entry[K, V]
	order list.List           // most recently used at the front
	cost  int64
}

type entry[K comparable, V any] struct {
	key   K
	value V
	cost  int64
}

// Len is the number of entries.
func (c *Cache[K, V]) Len() int { return len(c.items) }

// Cost is the sum of the costs of the entries.
func (c *Cache[K, V]) Cost() int64 { return c.cost }

// Get returns the value of k and marks it the most recently used.
func (c *Cache[K, V]) Get(k K) (V, bool) {
	el, ok := c.items[k]
	if !ok {
		var zero V
		return zero, false
	}
	c.order.MoveToFront(el)
	return el.Value.(*entry[K, V]).value, true
}

// Contains reports whether k is in the cache, without marking it used.
func (c *Cache[K, V]) Contains(k K) bool {
	_, ok := c.items[k]
	return ok
}

// Add sets the value and cost of k and marks it the most recently used,
// whether or not k was there before. It does not evict: see TrimTo.
func (c *Cache[K, V]) Add(k K, v V, cost int64) {
	if el, ok := c.items[k]; ok {
		e := el.Value.(*entry[K, V])
		c.cost += cost - e.cost
		e.value, e.cost = v, cost
		c.order.MoveToFront(el)
		return
	}
	if c.items == nil {
		c.items = make(map[K]*list.Element)
	}
	c.items[k] = c.order.PushFront(&entry[K, V]{k, v, cost})
	c.cost += cost
}

// Admit is Add for a cache of immutable values bounded by maxCost: it adds
// k as the most recently used entry unless k is there already (which is
// then left as it is, unmarked) or its cost alone is over maxCost, evicts
// least recently used entries until the total cost is at most maxCost, and
// reports whether k was added.
func (c *Cache[K, V]) Admit(k K, v V, cost, maxCost int64) bool {
	if cost > maxCost || c.Contains(k) {
		return false
	}
	c.Add(k, v, cost)
	c.TrimTo(maxCost, nil)
	return true
}

// Remove removes k and returns its value, if it was there.
func (c *Cache[K, V]) Remove(k K) (V, bool) {
	el, ok := c.items[k]
	if !ok {
		var zero V
		return zero, false
	}
	return c.removeElement(el).value, true
}

// RemoveOldest removes the least recently used entry and returns it; ok is
// false when the cache is empty.
func (c *Cache[K, V]) RemoveOldest() (k K, v V, ok bool) {
	el := c.order.Back()
	if el == nil {
		return k, v, false
	}
	e := c.removeElement(el)
	return e.key, e.value, true
}

// TrimTo removes least recently used entries until the total cost is at
// most maxCost (so TrimTo(0, ...) empties a cache of positive costs),
// calling evicted, if not nil, for each.
func (c *Cache[K, V]) TrimTo(maxCost int64, evicted func(K, V)) {
	for c.cost > maxCost {
		k, v, ok := c.RemoveOldest()
		if !ok {
			return
		}
		if evicted != nil {
			evicted(k, v)
		}
	}
}

// Oldest yields the entries from the least to the most recently used,
// without marking them used. The loop may Remove the entry it was given
// (to evict all but some entries, say); other changes end the order it
// walks in an unspecified place.
func (c *Cache[K, V]) Oldest() iter.Seq2[K, V] {
	return func(yield func(K, V) bool) {
		for el := c.order.Back(); el != nil; {
			prev := el.Prev()
			e := el.Value.(*entry[K, V])
			if !yield(e.key, e.value) {
				return
			}
			el = prev
		}
	}
}

func (c *Cache[K, V]) removeElement(el *list.Element) *entry[K, V] {
	e := c.order.Remove(el).(*entry[K, V])
	delete(c.items, e.key)
	c.cost -= e.cost
	return e
}
