package stripe

import (
	"container/list"
	"sync"
	"time"
)

// memory is a bounded map whose entries are forgotten ttl after they were
// put, or least recently put first once it holds max entries. It is safe
// for concurrent use.
type memory struct {
	ttl time.Duration
	max int
	now func() time.Time

	mu      sync.Mutex
	entries map[string]*list.Element // of *memoryEntry
	order   *list.List               // least recently put at the front
}

type memoryEntry struct {
	key   string
	value any
	at    time.Time
}

func newMemory(ttl time.Duration, limit int, now func() time.Time) *memory {
	return &memory{ttl: ttl, max: limit, now: now, entries: map[string]*list.Element{}, order: list.New()}
}

// get returns the value remembered under key.
func (m *memory) get(key string) (any, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	el, ok := m.entries[key]
	if !ok {
		return nil, false
	}
	e := el.Value.(*memoryEntry)
	if m.now().Sub(e.at) > m.ttl {
		m.order.Remove(el)
		delete(m.entries, key)
		return nil, false
	}
	return e.value, true
}

// put remembers value under key, forgetting the least recently put entries
// beyond max.
func (m *memory) put(key string, value any) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if el, ok := m.entries[key]; ok {
		e := el.Value.(*memoryEntry)
		e.value, e.at = value, m.now()
		m.order.MoveToBack(el)
		return
	}
	m.entries[key] = m.order.PushBack(&memoryEntry{key: key, value: value, at: m.now()})
	for m.order.Len() > m.max {
		oldest := m.order.Front()
		m.order.Remove(oldest)
		delete(m.entries, oldest.Value.(*memoryEntry).key)
	}
}
