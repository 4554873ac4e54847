package terminal

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// dialTimeout bounds the TCP connect and the SSH handshake with a node.
const dialTimeout = 10 * time.Second

var errHostKeyChanged = errors.New("the node's SSH host key differs from the one pinned for this allocation")

// login connects to the node's sshd as the allocation's user with a fresh
// Ed25519 key that exists only in memory, certified by the SSH CA for ttl.
func (s *Service) login(ctx context.Context, n node, ttl time.Duration) (*ssh.Client, error) {
	signer, err := s.certify(ctx, n.user, ttl)
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort(n.host, strconv.Itoa(n.port))
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, errcode.Wrap(err, CodeNodeUnreachable, "the allocation's node does not answer on SSH")
	}
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline) // the handshake does not watch ctx
	cfg := &ssh.ClientConfig{User: n.user, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: s.pinHostKey(n.allocation)}
	sc, chans, reqs, err := ssh.NewClientConn(conn, addr, cfg)
	if err != nil {
		_ = conn.Close()
		if errors.Is(err, errHostKeyChanged) {
			return nil, errcode.Wrap(err, CodeHostKeyMismatch, "the node's SSH host key changed since this allocation's first terminal session")
		}
		return nil, errcode.Wrap(err, CodeNodeUnreachable, "logging in to the allocation's node failed")
	}
	_ = conn.SetDeadline(time.Time{})
	return ssh.NewClient(sc, chans, reqs), nil
}

// certify makes an ephemeral key pair and has the CA sign its public half
// as a user certificate for principal.
func (s *Service) certify(ctx context.Context, principal string, ttl time.Duration) (ssh.Signer, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("terminal: ephemeral key: %w", err)
	}
	key, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return nil, fmt.Errorf("terminal: ephemeral key: %w", err)
	}
	signed, err := s.ca.SignSSHKey(ctx, ssh.MarshalAuthorizedKey(key.PublicKey()), principal, ttl)
	if err != nil {
		return nil, fmt.Errorf("terminal: sign the ephemeral key for %s: %w", principal, err)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey(signed.Certificate)
	if err != nil {
		return nil, fmt.Errorf("terminal: the CA's certificate: %w", err)
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		return nil, fmt.Errorf("terminal: the CA returned a %s, not a certificate", pub.Type())
	}
	signer, err := ssh.NewCertSigner(cert, key)
	if err != nil {
		return nil, fmt.Errorf("terminal: certificate signer: %w", err)
	}
	return signer, nil
}

// pinHostKey accepts the host key the allocation's first session saw, and
// pins the one presented when there is none yet. SSH asks again at each
// re-key, long after the request that dialled: the answer is remembered.
func (s *Service) pinHostKey(allocation uuid.UUID) ssh.HostKeyCallback {
	var pinned string
	return func(_ string, _ net.Addr, key ssh.PublicKey) error {
		line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(key)))
		if pinned == "" {
			ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
			defer cancel()
			err := s.pool.QueryRow(ctx, `INSERT INTO terminal_host_keys (allocation_id, public_key) VALUES ($1, $2)
				ON CONFLICT (allocation_id) DO UPDATE SET public_key = terminal_host_keys.public_key
				RETURNING public_key`, allocation, line).Scan(&pinned)
			if err != nil {
				return fmt.Errorf("terminal: pin host key: %w", err)
			}
		}
		if pinned != line {
			return errHostKeyChanged
		}
		return nil
	}
}
