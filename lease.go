package idempotency

import (
	"container/heap"
	"sync"
	"time"
)

// leaseTimers runs the lease renewals of a Server's running first
// executions from one timer: a heap of the leases by when each is next due,
// and one time.Timer set to the earliest. A call adds its lease when its
// handler starts and removes it when it returns, without allocating; most
// handlers return long before their first renewal is due, so the timer fires
// only for the few that run long. Each due renewal runs in a goroutine of its
// own (a renewal is a store call, and may block), as time.AfterFunc would.
type leaseTimers struct {
	mu    sync.Mutex
	due   leaseHeap
	t     *time.Timer
	armed time.Time // when t fires; zero when it is stopped
}

type leaseHeap []*leaseKeeper

func (h leaseHeap) Len() int           { return len(h) }
func (h leaseHeap) Less(i, j int) bool { return h[i].next.Before(h[j].next) }
func (h leaseHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *leaseHeap) Push(x any) {
	l := x.(*leaseKeeper)
	l.index = len(*h)
	*h = append(*h, l)
}
func (h *leaseHeap) Pop() any {
	old := *h
	l := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	l.index = -1
	return l
}

// add schedules l's renewal at l.next.
func (lt *leaseTimers) add(l *leaseKeeper) {
	lt.mu.Lock()
	heap.Push(&lt.due, l)
	lt.armLocked()
	lt.mu.Unlock()
}

// remove unschedules l, if it is scheduled.
func (lt *leaseTimers) remove(l *leaseKeeper) {
	lt.mu.Lock()
	if l.index >= 0 {
		heap.Remove(&lt.due, l.index)
	}
	lt.armLocked()
	lt.mu.Unlock()
}

// armLocked sets the timer to the earliest renewal, or stops it when there
// is none. lt.mu is held.
func (lt *leaseTimers) armLocked() {
	if len(lt.due) == 0 {
		if !lt.armed.IsZero() {
			lt.t.Stop()
			lt.armed = time.Time{}
		}
		return
	}
	next := lt.due[0].next
	if !lt.armed.IsZero() && !next.Before(lt.armed) {
		return // it fires first, and sets itself again
	}
	lt.armed = next
	d := time.Until(next)
	if lt.t == nil {
		lt.t = time.AfterFunc(d, lt.fire)
		return
	}
	lt.t.Reset(d)
}

// fire starts every renewal that is due, and sets the timer to the next.
func (lt *leaseTimers) fire() {
	now := time.Now()
	lt.mu.Lock()
	lt.armed = time.Time{}
	for len(lt.due) > 0 && !lt.due[0].next.After(now) {
		l := heap.Pop(&lt.due).(*leaseKeeper)
		go l.renew()
	}
	lt.armLocked()
	lt.mu.Unlock()
}
