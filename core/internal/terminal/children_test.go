package terminal_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/crypto/ssh"
)

// The benchmarks run this test binary again for the parts they keep out of
// their measurement; roleEnv names the part.
const (
	roleEnv = "GPUAAS_TERMINAL_BENCH_ROLE"
	// caEnv is the user CA the SSH server role trusts (authorized_keys).
	caEnv = "GPUAAS_TERMINAL_BENCH_CA"
)

func TestMain(m *testing.M) {
	var err error
	switch role := os.Getenv(roleEnv); role {
	case "":
		os.Exit(m.Run())
	case "sshd":
		err = serveSSH(os.Getenv(caEnv))
	case "clients":
		err = holdSessions(os.Stdin)
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// serveSSH is an SSH server on a loopback port that logs in certificates
// of ca for their principals and echoes a shell's input. It prints
// "ADDR host:port" and serves until its standard input closes.
func serveSSH(ca string) error {
	caKey, _, _, _, err := ssh.ParseAuthorizedKey([]byte(ca))
	if err != nil {
		return fmt.Errorf("sshd role: CA key: %w", err)
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	host, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return err
	}
	checker := &ssh.CertChecker{IsUserAuthority: func(k ssh.PublicKey) bool { return bytes.Equal(k.Marshal(), caKey.Marshal()) }}
	cfg := &ssh.ServerConfig{PublicKeyCallback: checker.Authenticate}
	cfg.AddHostKey(host)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Println("ADDR " + ln.Addr().String())
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go serveConn(c, cfg)
	}
}

func serveConn(c net.Conn, cfg *ssh.ServerConfig) {
	_, chans, reqs, err := ssh.NewServerConn(c, cfg)
	if err != nil {
		_ = c.Close()
		return
	}
	go ssh.DiscardRequests(reqs) // keepalives get a reply
	for nc := range chans {
		if nc.ChannelType() != "session" {
			_ = nc.Reject(ssh.UnknownChannelType, "sessions only")
			continue
		}
		ch, creqs, err := nc.Accept()
		if err != nil {
			continue
		}
		go func() {
			for r := range creqs {
				ok := r.Type == "pty-req" || r.Type == "window-change" || r.Type == "shell"
				if r.WantReply {
					_ = r.Reply(ok, nil)
				}
				if r.Type == "shell" {
					go func() { _, _ = io.Copy(ch, ch); _ = ch.Close() }()
				}
			}
		}()
	}
}

// holdSessions reads a WebSocket URL, then tokens, one a line, up to an
// empty line; opens a session with each (8 at a time, the token in
// Authorization), sends a resize so the shell opens, prints "OPEN n" and
// holds the sessions, reading them, until its input closes.
func holdSessions(in io.Reader) error {
	sc := bufio.NewScanner(in)
	if !sc.Scan() {
		return fmt.Errorf("clients role: no URL")
	}
	url := sc.Text()
	var tokens []string
	for sc.Scan() && sc.Text() != "" {
		tokens = append(tokens, sc.Text())
	}
	conns := make([]*websocket.Conn, len(tokens))
	errs := make(chan error, len(tokens))
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for i, tok := range tokens {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			c, err := openIdle(url, tok)
			conns[i] = c
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			fmt.Println("FAIL " + err.Error())
			return err
		}
	}
	fmt.Printf("OPEN %d\n", len(conns))
	for sc.Scan() {
	}
	for _, c := range conns {
		_ = c.Close(websocket.StatusNormalClosure, "")
	}
	return nil
}

func openIdle(url, token string) (*websocket.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + token}}})
	if err != nil {
		return nil, err
	}
	if err := c.Write(ctx, websocket.MessageText, []byte(`{"type":"resize","cols":80,"rows":24}`)); err != nil {
		return nil, err
	}
	go func() { // answers pings; ends when the session does
		for {
			if _, _, err := c.Read(context.Background()); err != nil {
				return
			}
		}
	}()
	return c, nil
}
