// Package toolpath finds the helper binaries that `go install` puts in place (versitygw,
// stripe-mock).
package toolpath

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Find looks for name in $GPUAAS_BIN_DIR, then $PATH, then $(go env GOPATH)/bin. installHint is
// the command that installs it, used in the error.
func Find(name, installHint string, getenv func(string) string) (string, error) {
	var tried []string
	if dir := getenv("GPUAAS_BIN_DIR"); dir != "" {
		p := filepath.Join(dir, name)
		if isExecutable(p) {
			return p, nil
		}
		tried = append(tried, dir)
	}
	if p, err := lookPath(name, getenv("PATH")); err == nil {
		return p, nil
	}
	tried = append(tried, "$PATH")
	for _, gopath := range goPaths(getenv) {
		p := filepath.Join(gopath, "bin", name)
		if isExecutable(p) {
			return p, nil
		}
		tried = append(tried, filepath.Join(gopath, "bin"))
	}
	return "", fmt.Errorf("%s not found in %s: install it with `%s`", name, strings.Join(tried, ", "), installHint)
}

func lookPath(name, pathEnv string) (string, error) {
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			continue
		}
		p := filepath.Join(dir, name)
		if isExecutable(p) {
			return p, nil
		}
	}
	return "", errors.New("not in PATH")
}

// goPaths is `go env GOPATH` when the go command is there, else $GOPATH, else ~/go.
func goPaths(getenv func(string) string) []string {
	if goBin, err := lookPath("go", getenv("PATH")); err == nil {
		if out, err := exec.Command(goBin, "env", "GOPATH").Output(); err == nil {
			if s := strings.TrimSpace(string(out)); s != "" {
				return filepath.SplitList(s)
			}
		}
	}
	if s := getenv("GOPATH"); s != "" {
		return filepath.SplitList(s)
	}
	if home := getenv("HOME"); home != "" {
		return []string{filepath.Join(home, "go")}
	}
	if home, err := os.UserHomeDir(); err == nil {
		return []string{filepath.Join(home, "go")}
	}
	return nil
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}
