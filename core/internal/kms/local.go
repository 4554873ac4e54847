package kms

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
)

// LocalKeyID is the KeyID of envelopes made by Local.
const LocalKeyID = "local"

const (
	masterKeySize = 32 // AES-256
	dataKeySize   = 32 // AES-256
)

var keyFileRE = regexp.MustCompile(`^v([1-9][0-9]*)\.key$`)

// Local is a Keyring whose master keys are files in one folder: vN.key
// holds version N, 32 random bytes. The folder must be mode 0700 and each
// key file 0600 (group and others have no access); Local refuses looser
// permissions rather than fixing them. The highest version encrypts; every
// version present decrypts. Several processes may share the folder: a
// version one of them adds by Rotate is picked up by the others when they
// first meet it in an envelope.
type Local struct {
	dir    string
	random io.Reader

	mu      sync.RWMutex
	keys    map[int]cipher.AEAD
	current int
}

var _ Keyring = (*Local)(nil)

// LocalOption configures a Local.
type LocalOption func(*Local)

// WithRandom sets the source of keys and nonces (default crypto/rand).
func WithRandom(r io.Reader) LocalOption { return func(l *Local) { l.random = r } }

// NewLocal opens the key folder dir, creating it (0700) and a first master
// key (0600) when they are missing. It fails when the folder or a key file
// is readable or writable by group or others, or when a key file is not
// exactly 32 bytes.
func NewLocal(dir string, opts ...LocalOption) (*Local, error) {
	l := &Local{dir: dir, random: rand.Reader, keys: map[int]cipher.AEAD{}}
	for _, o := range opts {
		o(l)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("kms: key folder %s: %w", dir, err)
	}
	if err := checkPrivate(dir, true); err != nil {
		return nil, err
	}
	versions, err := l.scan()
	if err != nil {
		return nil, err
	}
	if len(versions) == 0 {
		if _, err := l.create(1); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, err
		}
		if versions, err = l.scan(); err != nil {
			return nil, err
		}
	}
	for _, v := range versions {
		if err := l.load(v); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// checkPrivate fails unless path has no permission bits for group and
// others (and is a folder or a regular file, as wantDir says).
func checkPrivate(path string, wantDir bool) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("kms: %w", err)
	}
	switch {
	case wantDir && !fi.IsDir():
		return fmt.Errorf("kms: key folder %s is not a folder", path)
	case !wantDir && !fi.Mode().IsRegular():
		return fmt.Errorf("kms: key file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		want := os.FileMode(0o600)
		if wantDir {
			want = 0o700
		}
		return fmt.Errorf("kms: %s has mode %04o, which lets group or others in; refusing to use it (want %04o: chmod %o %s)",
			path, perm, want, want, path)
	}
	return nil
}

// scan lists the key versions present in the folder.
func (l *Local) scan() ([]int, error) {
	entries, err := os.ReadDir(l.dir)
	if err != nil {
		return nil, fmt.Errorf("kms: read key folder: %w", err)
	}
	var versions []int
	for _, e := range entries {
		m := keyFileRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		v, err := strconv.Atoi(m[1])
		if err != nil {
			continue
		}
		versions = append(versions, v)
	}
	return versions, nil
}

func (l *Local) keyPath(version int) string {
	return filepath.Join(l.dir, "v"+strconv.Itoa(version)+".key")
}

// load reads version's key file and makes it available.
func (l *Local) load(version int) error {
	path := l.keyPath(version)
	if err := checkPrivate(path, false); err != nil {
		return err
	}
	key, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("kms: read master key: %w", err)
	}
	defer clear(key)
	if len(key) != masterKeySize {
		return fmt.Errorf("kms: master key %s has %d bytes, want %d", path, len(key), masterKeySize)
	}
	aead, err := newGCM(key)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.keys[version] = aead
	if version > l.current {
		l.current = version
	}
	return nil
}

// create writes a new master key file for version. It fails with
// fs.ErrExist when the version exists already (another process made it).
func (l *Local) create(version int) (int, error) {
	key := make([]byte, masterKeySize)
	defer clear(key)
	if _, err := io.ReadFull(l.random, key); err != nil {
		return 0, fmt.Errorf("kms: new master key: %w", err)
	}
	tmp, err := os.CreateTemp(l.dir, ".new-key-*")
	if err != nil {
		return 0, fmt.Errorf("kms: new master key: %w", err)
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	if err := tmp.Chmod(0o600); err != nil {
		_ = tmp.Close()
		return 0, fmt.Errorf("kms: new master key: %w", err)
	}
	if _, err := tmp.Write(key); err != nil {
		_ = tmp.Close()
		return 0, fmt.Errorf("kms: new master key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return 0, fmt.Errorf("kms: new master key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return 0, fmt.Errorf("kms: new master key: %w", err)
	}
	// Link, unlike rename, never replaces an existing key.
	if err := os.Link(tmp.Name(), l.keyPath(version)); err != nil {
		return 0, fmt.Errorf("kms: new master key version %d: %w", version, err)
	}
	if d, err := os.Open(l.dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return version, nil
}

// CurrentVersion is the master key version Encrypt uses.
func (l *Local) CurrentVersion() int {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.current
}

// Rotate adds a new master key version, which encrypts from now on; older
// versions keep decrypting. It returns the new version.
func (l *Local) Rotate(ctx context.Context) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("kms: rotate: %w", err)
	}
	for {
		versions, err := l.scan()
		if err != nil {
			return 0, err
		}
		next := l.CurrentVersion()
		for _, v := range versions {
			next = max(next, v)
		}
		next++
		v, err := l.create(next)
		if errors.Is(err, fs.ErrExist) {
			continue // another process took that version; take the next
		}
		if err != nil {
			return 0, err
		}
		if err := l.load(v); err != nil {
			return 0, err
		}
		return v, nil
	}
}

// aead returns the key of version, loading it from disk if another process
// added it since.
func (l *Local) aead(version int) (cipher.AEAD, error) {
	l.mu.RLock()
	a, ok := l.keys[version]
	l.mu.RUnlock()
	if ok {
		return a, nil
	}
	if _, err := os.Stat(l.keyPath(version)); err != nil {
		return nil, fmt.Errorf("%w: %s version %d", ErrUnknownKey, LocalKeyID, version)
	}
	if err := l.load(version); err != nil {
		return nil, err
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.keys[version], nil
}

// wrapAAD binds a wrapped data key to the master key version that wrapped it.
func wrapAAD(version int) []byte {
	return []byte("gpuaas-kms/wrap/" + LocalKeyID + "/" + strconv.Itoa(version))
}

// Encrypt implements Keyring: a fresh data key encrypts plaintext, and the
// current master key version wraps the data key.
func (l *Local) Encrypt(ctx context.Context, plaintext, aad []byte) (Envelope, error) {
	if err := ctx.Err(); err != nil {
		return Envelope{}, fmt.Errorf("kms: encrypt: %w", err)
	}
	l.mu.RLock()
	version := l.current
	master := l.keys[version]
	l.mu.RUnlock()

	dk := make([]byte, dataKeySize)
	defer clear(dk)
	if _, err := io.ReadFull(l.random, dk); err != nil {
		return Envelope{}, fmt.Errorf("kms: encrypt: data key: %w", err)
	}
	wrapped, err := l.seal(master, dk, wrapAAD(version))
	if err != nil {
		return Envelope{}, err
	}
	data, err := newGCM(dk)
	if err != nil {
		return Envelope{}, err
	}
	nonce := make([]byte, data.NonceSize())
	if _, err := io.ReadFull(l.random, nonce); err != nil {
		return Envelope{}, fmt.Errorf("kms: encrypt: nonce: %w", err)
	}
	return Envelope{
		KeyID:      LocalKeyID,
		KeyVersion: version,
		WrappedKey: wrapped,
		Nonce:      nonce,
		Ciphertext: data.Seal(nil, nonce, plaintext, aad),
	}, nil
}

// Decrypt implements Keyring.
func (l *Local) Decrypt(ctx context.Context, env Envelope, aad []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("kms: decrypt: %w", err)
	}
	dk, err := l.unwrap(env)
	if err != nil {
		return nil, err
	}
	defer clear(dk)
	data, err := newGCM(dk)
	if err != nil {
		return nil, err
	}
	if len(env.Nonce) != data.NonceSize() {
		return nil, fmt.Errorf("%w: nonce of %d bytes", ErrDecrypt, len(env.Nonce))
	}
	plain, err := data.Open(nil, env.Nonce, env.Ciphertext, aad)
	if err != nil {
		return nil, fmt.Errorf("%w: ciphertext or aad altered", ErrDecrypt)
	}
	return plain, nil
}

// Rewrap re-wraps env's data key with the current master key version,
// leaving the ciphertext as it is; after every stored envelope is rewrapped
// an old version may be retired.
func (l *Local) Rewrap(ctx context.Context, env Envelope) (Envelope, error) {
	if err := ctx.Err(); err != nil {
		return Envelope{}, fmt.Errorf("kms: rewrap: %w", err)
	}
	dk, err := l.unwrap(env)
	if err != nil {
		return Envelope{}, err
	}
	defer clear(dk)
	l.mu.RLock()
	version := l.current
	master := l.keys[version]
	l.mu.RUnlock()
	wrapped, err := l.seal(master, dk, wrapAAD(version))
	if err != nil {
		return Envelope{}, err
	}
	out := env
	out.KeyVersion = version
	out.WrappedKey = wrapped
	out.Nonce = append([]byte(nil), env.Nonce...)
	out.Ciphertext = append([]byte(nil), env.Ciphertext...)
	return out, nil
}

// unwrap returns env's data key.
func (l *Local) unwrap(env Envelope) ([]byte, error) {
	if env.KeyID != LocalKeyID {
		return nil, fmt.Errorf("%w: key %q, this keyring holds %q", ErrUnknownKey, env.KeyID, LocalKeyID)
	}
	master, err := l.aead(env.KeyVersion)
	if err != nil {
		return nil, err
	}
	ns := master.NonceSize()
	if len(env.WrappedKey) < ns {
		return nil, fmt.Errorf("%w: wrapped key too short", ErrDecrypt)
	}
	dk, err := master.Open(nil, env.WrappedKey[:ns], env.WrappedKey[ns:], wrapAAD(env.KeyVersion))
	if err != nil || len(dk) != dataKeySize {
		return nil, fmt.Errorf("%w: wrapped data key altered", ErrDecrypt)
	}
	return dk, nil
}

// seal encrypts plaintext with a, prefixed by a random nonce.
func (l *Local) seal(a cipher.AEAD, plaintext, aad []byte) ([]byte, error) {
	nonce := make([]byte, a.NonceSize(), a.NonceSize()+len(plaintext)+a.Overhead())
	if _, err := io.ReadFull(l.random, nonce); err != nil {
		return nil, fmt.Errorf("kms: nonce: %w", err)
	}
	return a.Seal(nonce, nonce, plaintext, aad), nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("kms: %w", err)
	}
	a, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("kms: %w", err)
	}
	return a, nil
}
