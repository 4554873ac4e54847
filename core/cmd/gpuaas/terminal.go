package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/coder/websocket"
	"golang.org/x/term"

	"github.com/gpuaas/gpuaas/core/internal/terminal"
	"github.com/gpuaas/gpuaas/sdk/client"
)

// terminalCmd opens a shell on an allocation's node through the core's
// browser terminal (doc/terminal.md): it mints a token, opens the
// WebSocket with it, puts the local terminal in raw mode and relays bytes
// and window sizes until the shell ends; the command exits with the
// shell's status.
func terminalCmd(ctx context.Context, c *client.ClientWithResponses, apiURL string, args []string) error {
	fs := newFlags("terminal")
	gateway := fs.String("gateway", "", "terminal gateway URL (default: the API's)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("terminal: want ALLOCATION_ID")
	}
	id, err := allocationID("terminal", pos[0])
	if err != nil {
		return err
	}
	resp, err := c.CreateTerminalTokenWithResponse(ctx, id)
	if err != nil {
		return fmt.Errorf("API unreachable: %w", err)
	}
	if resp.JSON201 == nil {
		return apiError(resp.StatusCode(), resp.Body)
	}
	base := apiURL
	if *gateway != "" {
		base = strings.TrimRight(*gateway, "/")
	}
	wsURL := "ws" + strings.TrimPrefix(base, "http") + resp.JSON201.WebsocketPath

	in, out := os.Stdin, os.Stdout
	resize := make(chan [2]int, 1)
	if fd := int(in.Fd()); term.IsTerminal(fd) {
		old, err := term.MakeRaw(fd)
		if err != nil {
			return fmt.Errorf("terminal: raw mode: %w", err)
		}
		defer func() { _ = term.Restore(fd, old) }()
		sendSize := func() {
			if cols, rows, err := term.GetSize(int(out.Fd())); err == nil {
				select {
				case resize <- [2]int{cols, rows}:
				default:
				}
			}
		}
		sendSize()
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				sendSize()
			}
		}()
	}
	code, err := terminalSession(ctx, wsURL, resp.JSON201.Token, in, out, resize)
	if err != nil {
		return err
	}
	if code != 0 {
		return exitError{code: code}
	}
	return nil
}

// exitError is a remote shell's exit status, passed on as the command's.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("the shell exited with status %d", e.code) }

// terminalSession relays in to the shell and the shell to out over the
// WebSocket at wsURL until the shell ends, sending each size from resize
// as a control message, and returns the shell's exit status.
func terminalSession(ctx context.Context, wsURL, token string, in io.Reader, out io.Writer, resize <-chan [2]int) (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	conn, hresp, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{
		Subprotocols: []string{terminal.Subprotocol},
		HTTPHeader:   http.Header{"Authorization": {"Bearer " + token}},
	})
	if err != nil {
		if hresp != nil {
			body, _ := io.ReadAll(io.LimitReader(hresp.Body, 4<<10))
			return 0, apiError(hresp.StatusCode, body)
		}
		return 0, fmt.Errorf("terminal: %w", err)
	}
	defer conn.CloseNow()
	conn.SetReadLimit(1 << 20)

	go func() { // window sizes; the first one opens the shell at that size
		for {
			select {
			case <-ctx.Done():
				return
			case s := <-resize:
				msg, _ := json.Marshal(map[string]any{"type": "resize", "cols": s[0], "rows": s[1]})
				if conn.Write(ctx, websocket.MessageText, msg) != nil {
					return
				}
			}
		}
	}()
	go func() { // keystrokes
		buf := make([]byte, 32<<10)
		for {
			n, err := in.Read(buf)
			if n > 0 && conn.Write(ctx, websocket.MessageBinary, buf[:n]) != nil {
				return
			}
			if err != nil {
				return
			}
		}
	}()
	for {
		typ, data, err := conn.Read(ctx)
		if err != nil {
			return shellStatus(err)
		}
		if typ == websocket.MessageBinary {
			if _, err := out.Write(data); err != nil {
				return 0, err
			}
		}
	}
}

// shellStatus reads the end of a session: the shell's exit status from a
// normal close ("exit status N"), an error for any other close.
func shellStatus(err error) (int, error) {
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		return 0, fmt.Errorf("terminal: connection lost: %w", err)
	}
	if ce.Code != websocket.StatusNormalClosure {
		return 0, fmt.Errorf("terminal: session closed (%d %s)", ce.Code, ce.Reason)
	}
	if n, ok := strings.CutPrefix(ce.Reason, "exit status "); ok {
		if code, err := strconv.Atoi(n); err == nil {
			return code, nil
		}
	}
	if strings.HasPrefix(ce.Reason, "killed by signal") {
		return 128, nil
	}
	return 0, nil
}
