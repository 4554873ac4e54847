package terminal

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fasthttp/websocket"
	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// Close codes of doc/terminal.md beyond RFC 6455's.
const (
	// CloseIdle ends a session that saw no input and no output for the
	// policy's idle timeout.
	CloseIdle = 4000
)

const (
	// writeWait bounds one write to the client; a client that does not read
	// for this long loses its session.
	writeWait = 10 * time.Second
	// closeWait is how long the server waits for the client's close frame
	// after sending its own.
	closeWait = time.Second
	// outputBuffer is the largest binary frame the server sends.
	outputBuffer = 8 << 10
	// defaultCols and defaultRows size a PTY opened by a data frame.
	defaultCols, defaultRows = 80, 24
	maxDimension             = 1000
)

// Control is a text frame from the client.
type Control struct {
	// Type is "resize".
	Type string `json:"type"`
	Cols int    `json:"cols,omitempty"`
	Rows int    `json:"rows,omitempty"`
}

// session is one WebSocket relayed to one shell on the node. The goroutine
// that runs serve reads the client; pump reads the shell; supervise sends
// keepalives and watches the idle timeout and shutdown.
type session struct {
	id   uuid.UUID
	svc  *Service
	node *ssh.Client
	lim  Limits
	log  hclog.Logger
	ws   *websocket.Conn

	shell *ssh.Session
	stdin io.WriteCloser

	claimed  atomic.Bool  // by serve, or by abandon when serve never came
	active   atomic.Int64 // unix nanos of the last byte either way
	nodeSeen atomic.Int64 // unix nanos of the node's last keepalive reply
	pinging  atomic.Bool

	once     sync.Once
	done     chan struct{} // closed by finish
	reason   string        // why the session ended, for the log and metrics
	tasks    sync.WaitGroup
	deadline sync.Mutex // orders extendRead after finish's short deadline
	finished bool
}

// closing is how a session ends: the close frame to send (code 0 sends
// none: the library sent one already, or the client is gone) and the reason
// recorded.
type closing struct {
	code   int
	text   string
	reason string
}

// newSession makes the session that serves once upgraded.
func (s *Service) newSession(id uuid.UUID, n node, p *principal.Principal, client *ssh.Client, lim Limits) *session {
	se := &session{id: id, svc: s, node: client, lim: lim, done: make(chan struct{}),
		log: s.log.With("session_id", id, "allocation_id", n.allocation, "actor", p.Actor())}
	se.touch(time.Now())
	se.nodeSeen.Store(time.Now().UnixNano())
	return se
}

func (se *session) touch(t time.Time) { se.active.Store(t.UnixNano()) }

// serve runs the session on the upgraded connection until either side ends.
func (se *session) serve(ws *websocket.Conn) {
	if !se.claimed.CompareAndSwap(false, true) {
		_ = ws.Close()
		return
	}
	se.ws = ws
	m := se.svc.metrics
	m.opened.Inc()
	m.active.Inc()
	se.log.Info("terminal session opened")
	ws.SetReadLimit(se.lim.MaxFrameBytes)
	se.extendRead()
	ws.SetPongHandler(func(string) error { se.extendRead(); return nil })
	se.tasks.Add(1)
	go se.supervise()

	se.finish(se.readLoop())
	se.tasks.Wait()
	_ = ws.Close()
	se.svc.release(se.id)
	m.active.Dec()
	m.closed.WithLabelValues(se.reason).Inc()
	se.log.Info("terminal session closed", "reason", se.reason)
	se.svc.sessions.Done()
}

// abandon undoes an admitted session that was never served (its upgrade
// failed).
func (se *session) abandon() {
	if !se.claimed.CompareAndSwap(false, true) {
		return
	}
	_ = se.node.Close()
	se.svc.release(se.id)
	se.svc.sessions.Done()
}

// extendRead gives the client three keepalive intervals to send anything
// (a pong counts).
func (se *session) extendRead() {
	se.deadline.Lock()
	defer se.deadline.Unlock()
	if !se.finished {
		_ = se.ws.SetReadDeadline(time.Now().Add(3 * se.lim.Keepalive))
	}
}

// readLoop relays client frames until the client or finish ends it.
func (se *session) readLoop() closing {
	for {
		typ, data, err := se.ws.ReadMessage()
		if err != nil {
			return readClosing(err)
		}
		select {
		case <-se.done:
			return closing{} // ended meanwhile: nothing more reaches the shell
		default:
		}
		se.extendRead()
		se.touch(time.Now())
		var c *closing
		switch typ {
		case websocket.BinaryMessage:
			c = se.input(data)
		case websocket.TextMessage:
			c = se.control(data)
		}
		if c != nil {
			return *c
		}
	}
}

// readClosing explains a read error. The library has answered a close frame,
// an oversized frame (1009) or a protocol error itself.
func readClosing(err error) closing {
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case errors.As(err, &ce):
		return closing{reason: "client"}
	case errors.Is(err, websocket.ErrReadLimit):
		return closing{reason: "frame_too_large"}
	case errors.As(err, &ne) && ne.Timeout():
		return closing{reason: "client_keepalive"}
	}
	return closing{reason: "client_gone"}
}

// input writes terminal bytes to the shell, opening it first if needed.
func (se *session) input(data []byte) *closing {
	if se.shell == nil {
		if c := se.start(defaultCols, defaultRows); c != nil {
			return c
		}
	}
	if _, err := se.stdin.Write(data); err != nil {
		return &closing{code: websocket.CloseInternalServerErr, text: "node connection lost", reason: "node_lost"}
	}
	se.svc.metrics.bytesIn.Add(float64(len(data)))
	return nil
}

// control handles a text frame.
func (se *session) control(data []byte) *closing {
	var m Control
	if err := json.Unmarshal(data, &m); err != nil || m.Type != "resize" ||
		m.Cols < 1 || m.Rows < 1 || m.Cols > maxDimension || m.Rows > maxDimension {
		return &closing{code: websocket.CloseInvalidFramePayloadData, text: "invalid control message", reason: "bad_control"}
	}
	if se.shell == nil {
		return se.start(m.Cols, m.Rows)
	}
	if err := se.shell.WindowChange(m.Rows, m.Cols); err != nil {
		return &closing{code: websocket.CloseInternalServerErr, text: "node connection lost", reason: "node_lost"}
	}
	return nil
}

// start opens the PTY and the shell, sized cols x rows.
func (se *session) start(cols, rows int) *closing {
	fail := func(err error) *closing {
		se.log.Warn("opening the shell failed", "error", err)
		return &closing{code: websocket.CloseInternalServerErr, text: "the node did not open a shell", reason: "shell_failed"}
	}
	sh, err := se.node.NewSession()
	if err != nil {
		return fail(err)
	}
	se.shell = sh
	if se.stdin, err = sh.StdinPipe(); err != nil {
		return fail(err)
	}
	stdout, err := sh.StdoutPipe()
	if err != nil {
		return fail(err)
	}
	// With a PTY, sshd sends the terminal's output on stdout alone.
	if _, err := sh.StderrPipe(); err != nil {
		return fail(err)
	}
	modes := ssh.TerminalModes{ssh.ECHO: 1, ssh.TTY_OP_ISPEED: 38400, ssh.TTY_OP_OSPEED: 38400}
	if err := sh.RequestPty("xterm-256color", rows, cols, modes); err != nil {
		return fail(err)
	}
	if err := sh.Shell(); err != nil {
		return fail(err)
	}
	se.tasks.Add(1)
	go se.pump(stdout)
	return nil
}

// pump relays the shell's output until it ends, then closes the session
// with the shell's exit.
func (se *session) pump(stdout io.Reader) {
	defer se.tasks.Done()
	buf := make([]byte, outputBuffer)
	for {
		n, err := stdout.Read(buf)
		if n > 0 {
			se.touch(time.Now())
			_ = se.ws.SetWriteDeadline(time.Now().Add(writeWait))
			if werr := se.ws.WriteMessage(websocket.BinaryMessage, buf[:n]); werr != nil {
				se.finish(closing{reason: "client_gone"})
				return
			}
			se.svc.metrics.bytesOut.Add(float64(n))
		}
		if err != nil {
			break
		}
	}
	se.finish(exitClosing(se.shell.Wait()))
}

// exitClosing is the close frame for a shell that ended with err.
func exitClosing(err error) closing {
	var ee *ssh.ExitError
	switch {
	case err == nil:
		return closing{code: websocket.CloseNormalClosure, text: "exit status 0", reason: "exit"}
	case errors.As(err, &ee) && ee.Signal() != "":
		return closing{code: websocket.CloseNormalClosure, text: "killed by signal " + ee.Signal(), reason: "exit"}
	case errors.As(err, &ee):
		return closing{code: websocket.CloseNormalClosure, text: fmt.Sprintf("exit status %d", ee.ExitStatus()), reason: "exit"}
	}
	return closing{code: websocket.CloseInternalServerErr, text: "node connection lost", reason: "node_lost"}
}

// supervise pings the client and the node every keepalive interval, and
// ends the session when it is idle, when the node stops answering or when
// the service shuts down.
func (se *session) supervise() {
	defer se.tasks.Done()
	t := time.NewTicker(se.lim.Keepalive)
	defer t.Stop()
	for {
		select {
		case <-se.done:
			return
		case <-se.svc.stopping:
			se.finish(closing{code: websocket.CloseGoingAway, text: "server shutting down", reason: "shutdown"})
			return
		case now := <-t.C:
			if now.Sub(time.Unix(0, se.active.Load())) >= se.lim.IdleTimeout {
				se.finish(closing{code: CloseIdle, text: "idle timeout", reason: "idle"})
				return
			}
			if now.Sub(time.Unix(0, se.nodeSeen.Load())) >= 3*se.lim.Keepalive {
				se.finish(closing{code: websocket.CloseInternalServerErr, text: "node connection lost", reason: "node_keepalive"})
				return
			}
			_ = se.ws.WriteControl(websocket.PingMessage, nil, now.Add(writeWait))
			se.pingNode()
		}
	}
}

// pingNode sends an OpenSSH keepalive unless one is still out; any reply,
// even a refusal, shows the node is there.
func (se *session) pingNode() {
	if !se.pinging.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer se.pinging.Store(false)
		if _, _, err := se.node.SendRequest("keepalive@openssh.com", true, nil); err == nil {
			se.nodeSeen.Store(time.Now().UnixNano())
		}
	}()
}

// finish ends the session once: it sends c's close frame, if any, closes
// the SSH connection (which unblocks a write to a shell that stopped
// reading) and gives the client closeWait to answer before the read loop
// stops.
func (se *session) finish(c closing) {
	se.once.Do(func() {
		se.reason = c.reason
		if c.code != 0 {
			_ = se.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(c.code, c.text), time.Now().Add(closeWait))
		}
		_ = se.node.Close()
		se.deadline.Lock()
		se.finished = true
		_ = se.ws.SetReadDeadline(time.Now().Add(closeWait))
		se.deadline.Unlock()
		close(se.done)
	})
}
