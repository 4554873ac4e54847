package pki

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// The local backend's files follow kms.Local's rules: folders 0700, files
// 0600, and anything readable or writable by group or others is refused
// rather than fixed.

// ensurePrivateDir creates dir (0700) when missing and checks it.
func ensurePrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pki: key folder %s: %w", dir, err)
	}
	return checkPrivate(dir, true)
}

// checkPrivate fails unless path has no permission bits for group and
// others (and is a folder or a regular file, as wantDir says).
func checkPrivate(path string, wantDir bool) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	switch {
	case wantDir && !fi.IsDir():
		return fmt.Errorf("pki: key folder %s is not a folder", path)
	case !wantDir && !fi.Mode().IsRegular():
		return fmt.Errorf("pki: key file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		want := os.FileMode(0o600)
		if wantDir {
			want = 0o700
		}
		return fmt.Errorf("pki: %s has mode %04o, which lets group or others in; refusing to use it (want %04o: chmod %o %s)",
			path, perm, want, want, path)
	}
	return nil
}

// readPrivate reads a file after checking its permissions.
func readPrivate(path string) ([]byte, error) {
	if err := checkPrivate(path, false); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	return b, nil
}

// createPrivate writes data to path (0600) atomically and never over an
// existing file: it fails with fs.ErrExist when another process made path
// first.
func createPrivate(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".new-*")
	if err != nil {
		return fmt.Errorf("pki: write %s: %w", path, err)
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	err = tmp.Chmod(0o600)
	if err == nil {
		_, err = tmp.Write(data)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pki: write %s: %w", path, err)
	}
	// Link, unlike rename, never replaces an existing file.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("pki: write %s: %w", path, fs.ErrExist)
		}
		return fmt.Errorf("pki: write %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}

// loadOrCreate returns path's content, creating it with generate() first when
// it is missing. When two processes race, both end up with the winner's.
func loadOrCreate(path string, generate func() ([]byte, error)) ([]byte, error) {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		data, err := generate()
		if err != nil {
			return nil, err
		}
		if err := createPrivate(path, data); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, err
		}
	}
	return readPrivate(path)
}

// appendPrivate appends one line to path (created 0600). Lines shorter than
// the pipe buffer are appended atomically, so several processes may share
// the file.
func appendPrivate(path, line string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := checkPrivate(path, false); err != nil {
		_ = f.Close()
		return err
	}
	_, err = f.WriteString(line + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pki: append %s: %w", path, err)
	}
	return nil
}
