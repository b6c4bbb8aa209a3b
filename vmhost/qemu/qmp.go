package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// qmp is a minimal client of QEMU's machine protocol: one command at a
// time, events delivered to a callback.
type qmp struct {
	conn    net.Conn
	onEvent func(qmpEvent)

	cmdMu   sync.Mutex // one command in flight
	replies chan qmpMessage
	done    chan struct{}
	endOnce sync.Once
	err     error // why the connection ended; set before done closes
}

type qmpEvent struct {
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
}

type qmpMessage struct {
	QMP    json.RawMessage `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
}

// dialQMP connects to QEMU's QMP socket, retrying until it exists (QEMU
// creates it while starting) or ctx ends, and negotiates capabilities.
func dialQMP(ctx context.Context, path string, onEvent func(qmpEvent)) (*qmp, error) {
	var conn net.Conn
	var err error
	for {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", path)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to QMP socket %s: %w", path, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	q := &qmp{conn: conn, onEvent: onEvent, replies: make(chan qmpMessage, 1), done: make(chan struct{})}
	greeting := make(chan error, 1)
	go q.read(greeting)
	select {
	case err := <-greeting:
		if err != nil {
			conn.Close()
			return nil, err
		}
	case <-ctx.Done():
		conn.Close()
		return nil, fmt.Errorf("QMP greeting: %w", ctx.Err())
	}
	if _, err := q.execute(ctx, "qmp_capabilities", nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) read(greeting chan<- error) {
	sc := bufio.NewScanner(q.conn)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	first := true
	var err error
	for sc.Scan() {
		var m qmpMessage
		if err = json.Unmarshal(sc.Bytes(), &m); err != nil {
			err = fmt.Errorf("QMP: bad message %q: %w", sc.Text(), err)
			break
		}
		switch {
		case first:
			first = false
			if m.QMP == nil {
				err = fmt.Errorf("QMP: unexpected greeting %q", sc.Text())
				greeting <- err
				q.finish(err)
				return
			}
			greeting <- nil
		case m.Event != "":
			if q.onEvent != nil {
				q.onEvent(qmpEvent{Event: m.Event, Data: m.Data})
			}
		default:
			select {
			case q.replies <- m:
			default:
				// A reply nobody waits for (its command was abandoned).
			}
		}
	}
	if err == nil {
		err = sc.Err()
	}
	if err == nil {
		err = errors.New("QMP: connection closed")
	}
	if first {
		greeting <- err
	}
	q.finish(err)
}

func (q *qmp) finish(err error) {
	q.endOnce.Do(func() {
		q.err = err
		close(q.done)
	})
}

// execute runs a command and returns its "return" value.
func (q *qmp) execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	q.cmdMu.Lock()
	defer q.cmdMu.Unlock()
	select {
	case <-q.done:
		return nil, fmt.Errorf("QMP %s: %w", cmd, q.err)
	default:
	}
	// Drop a stale reply of an abandoned command.
	select {
	case <-q.replies:
	default:
	}
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if dl, ok := ctx.Deadline(); ok {
		q.conn.SetWriteDeadline(dl)
		defer q.conn.SetWriteDeadline(time.Time{})
	}
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	select {
	case m := <-q.replies:
		if m.Error != nil {
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, m.Error.Class, m.Error.Desc)
		}
		return m.Return, nil
	case <-q.done:
		// The reader ended (e.g. "quit" closes the socket); a reply may
		// still have been queued.
		select {
		case m := <-q.replies:
			return m.Return, nil
		default:
		}
		return nil, fmt.Errorf("QMP %s: %w", cmd, q.err)
	case <-ctx.Done():
		return nil, fmt.Errorf("QMP %s: %w", cmd, ctx.Err())
	}
}

// Close closes the connection.
func (q *qmp) Close() error { return q.conn.Close() }
