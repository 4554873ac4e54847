package pki_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/pki"
)

func TestLocalKeepsStateAcrossRestarts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "pki")
	a, err := pki.NewLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	chain, _ := a.CAChain(ctx)
	sshKey, _ := a.SSHCAPublicKey(ctx)
	cert, err := a.SignCSR(ctx, newCSR(t, ed25519Key(t), x509.CertificateRequest{}), "node-1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Revoke(ctx, cert.Serial); err != nil {
		t.Fatal(err)
	}
	if err := a.EnsureKey(ctx, "tasks"); err != nil {
		t.Fatal(err)
	}
	sig, v, err := a.Sign(ctx, "tasks", []byte("p"))
	if err != nil {
		t.Fatal(err)
	}

	// Another process on the same folder (or this one restarted).
	b, err := pki.NewLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	chain2, _ := b.CAChain(ctx)
	sshKey2, _ := b.SSHCAPublicKey(ctx)
	if !bytes.Equal(chain, chain2) || !bytes.Equal(sshKey, sshKey2) {
		t.Fatal("CA or SSH CA changed across a restart")
	}
	if r, err := b.Revocations(ctx); err != nil || r.Serials[cert.Serial].IsZero() {
		t.Fatalf("revocation lost across a restart: %v, %v", r.Serials, err)
	}
	if err := b.Verify(ctx, "tasks", []byte("p"), sig, v); err != nil {
		t.Fatalf("signature from before the restart: %v", err)
	}
	// A rotation by one process is used by the other's next Sign.
	if nv, err := a.Rotate(ctx, "tasks"); err != nil || nv != 2 {
		t.Fatalf("Rotate = %d, %v", nv, err)
	}
	if _, v, err := b.Sign(ctx, "tasks", []byte("p")); err != nil || v != 2 {
		t.Fatalf("other process signs with v%d, %v; want v2", v, err)
	}
}

func TestLocalConcurrentStartMakesOneCA(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "pki")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	chains := make([][]byte, 4)
	for i := range chains {
		wg.Go(func() {
			l, err := pki.NewLocal(dir)
			if err != nil {
				t.Error(err)
				return
			}
			chains[i], _ = l.CAChain(ctx)
		})
	}
	wg.Wait()
	for _, c := range chains[1:] {
		if !bytes.Equal(c, chains[0]) {
			t.Fatal("concurrent starts made different CAs")
		}
	}
}

func TestLocalRefusesLoosePermissions(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		path string // relative to the folder; "" is the folder
		mode os.FileMode
	}{
		{"folder readable by group", "", 0o750},
		{"CA key readable by others", "ca.pem", 0o604},
		{"SSH CA key writable by group", "ssh_ca.key", 0o620},
		{"revocations readable by others", "revoked.log", 0o644},
		{"signing key folder open", "signing/tasks", 0o755},
		{"signing key readable", "signing/tasks/v1.key", 0o640},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			dir := filepath.Join(t.TempDir(), "pki")
			l, err := pki.NewLocal(dir)
			if err != nil {
				t.Fatal(err)
			}
			cert, err := l.SignCSR(ctx, newCSR(t, ed25519Key(t), x509.CertificateRequest{}), "n", time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if err := l.Revoke(ctx, cert.Serial); err != nil {
				t.Fatal(err)
			}
			if err := l.EnsureKey(ctx, "tasks"); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(filepath.Join(dir, c.path), c.mode); err != nil {
				t.Fatal(err)
			}
			l2, err := pki.NewLocal(dir)
			if err == nil {
				_, _, err = l2.Sign(ctx, "tasks", []byte("x"))
			}
			if err == nil || !strings.Contains(err.Error(), "refusing") {
				t.Fatalf("a %04o %s was accepted: %v", c.mode, c.path, err)
			}
		})
	}
	t.Run("files are created private", func(t *testing.T) {
		t.Parallel()
		dir := filepath.Join(t.TempDir(), "pki")
		l, err := pki.NewLocal(dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.EnsureKey(context.Background(), "tasks"); err != nil {
			t.Fatal(err)
		}
		err = filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			if fi.Mode().Perm()&0o077 != 0 {
				t.Errorf("%s has mode %04o", path, fi.Mode().Perm())
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

// fakeCA counts Revocations calls and can fail them.
type fakeCA struct {
	pki.CA
	mu    sync.Mutex
	calls int
	fail  bool
	list  map[string]time.Time
}

var _ pki.CA = (*fakeCA)(nil)

func (f *fakeCA) Revocations(context.Context) (pki.Revocations, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.fail {
		return pki.Revocations{}, errors.New("vault unreachable")
	}
	return pki.Revocations{Serials: f.list}, nil
}

func (f *fakeCA) Revoke(context.Context, string) error { return nil }

func TestRevocationCheckerCachesAndFailsClosed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	now := time.Unix(1_700_000_000, 0)
	ca := &fakeCA{list: map[string]time.Time{}}
	c := pki.NewRevocationChecker(ca, pki.WithCheckerNow(func() time.Time { return now }),
		pki.WithMaxAge(30*time.Second), pki.WithMaxStale(2*time.Minute))
	check := func(serial string, want bool) {
		t.Helper()
		if got, err := c.Revoked(ctx, serial); err != nil || got != want {
			t.Fatalf("Revoked(%s) = %v, %v; want %v", serial, got, err, want)
		}
	}
	check("0a:0b", false)
	check("0a:0b", false)
	if ca.calls != 1 {
		t.Fatalf("%d fetches, want 1 (cached)", ca.calls)
	}
	// Revoked elsewhere: seen once the cache is older than MaxAge.
	ca.list = map[string]time.Time{"0a:0b": now}
	now = now.Add(29 * time.Second)
	check("0a:0b", false)
	now = now.Add(2 * time.Second)
	check("0A0B", true)
	// Revoked through the checker: refused at once.
	if err := c.Revoke(ctx, "0c"); err != nil {
		t.Fatal(err)
	}
	check("0c", true)
	// Fetching fails: the list is used while younger than MaxStale, then
	// checks fail.
	ca.fail = true
	now = now.Add(time.Minute)
	check("0a:0b", true)
	now = now.Add(2 * time.Minute)
	if _, err := c.Revoked(ctx, "0a:0b"); err == nil {
		t.Fatal("stale list used past MaxStale")
	}
	if _, err := c.Revoked(ctx, "zz"); !errors.Is(err, pki.ErrInvalid) {
		t.Fatalf("malformed serial: %v", err)
	}
}

func TestNormalizeSerial(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"1f:0a:ff": "1f:0a:ff", "1F-0A-FF": "1f:0a:ff", "1f0aff": "1f:0a:ff", " 00:1f ": "1f", "0": "00",
	} {
		if got, err := pki.NormalizeSerial(in); err != nil || got != want {
			t.Errorf("NormalizeSerial(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "xyz", "1f:0g", "+1"} {
		if _, err := pki.NormalizeSerial(bad); !errors.Is(err, pki.ErrInvalid) {
			t.Errorf("NormalizeSerial(%q) = %v, want ErrInvalid", bad, err)
		}
	}
}
