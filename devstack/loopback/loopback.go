// Package loopback hands out free TCP ports on 127.0.0.1 and waits for them to open or close.
package loopback

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"
)

// Host is the only address the dev stack listens on.
const Host = "127.0.0.1"

// Ports reserves free loopback ports. Each reserved port stays bound until Release, so one
// Ports never hands out the same port twice and no other process takes it meanwhile.
type Ports struct {
	held []net.Listener
}

// Take reserves one free port.
func (p *Ports) Take() (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(Host, "0"))
	if err != nil {
		return 0, fmt.Errorf("reserve loopback port: %w", err)
	}
	p.held = append(p.held, l)
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Release unbinds all reserved ports so that the components can listen on them.
func (p *Ports) Release() {
	for _, l := range p.held {
		_ = l.Close()
	}
	p.held = nil
}

// Addr returns "127.0.0.1:port".
func Addr(port int) string {
	return net.JoinHostPort(Host, strconv.Itoa(port))
}

// Open reports whether something accepts TCP connections on addr.
func Open(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

// WaitClosed returns once nothing accepts connections on addr any more.
func WaitClosed(ctx context.Context, addr string) error {
	for Open(addr) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s still accepts connections: %w", addr, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// Poll calls check every interval until it returns nil, the context ends, or stop
// (which may be nil) is closed. It returns the last error of check when it gives up.
func Poll(ctx context.Context, interval time.Duration, stop <-chan struct{}, check func(context.Context) error) error {
	var last error
	for {
		attemptCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		last = check(attemptCtx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), last)
		case <-stop:
			return last
		case <-time.After(interval):
		}
	}
}
