package toolpath_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/devstack/toolpath"
)

func TestFind(t *testing.T) {
	t.Parallel()
	binDir, pathDir, goPath := t.TempDir(), t.TempDir(), t.TempDir()
	write := func(dir, name string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	inBinDir := write(binDir, "tool-a")
	write(pathDir, "tool-a")
	inPath := write(pathDir, "tool-b")
	inGoPath := write(filepath.Join(goPath, "bin"), "tool-c")
	env := map[string]string{"GPUAAS_BIN_DIR": binDir, "PATH": pathDir, "GOPATH": goPath, "HOME": t.TempDir()}
	getenv := func(k string) string { return env[k] }

	for _, tc := range []struct{ name, want string }{
		{"tool-a", inBinDir},
		{"tool-b", inPath},
		{"tool-c", inGoPath},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := toolpath.Find(tc.name, "go install x", getenv)
			if err != nil || got != tc.want {
				t.Fatalf("Find = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	t.Run("missing", func(t *testing.T) {
		_, err := toolpath.Find("tool-d", "go install example.com/tool-d@latest", getenv)
		if err == nil || !strings.Contains(err.Error(), "go install example.com/tool-d@latest") {
			t.Fatalf("err = %v, want the install hint", err)
		}
	})
}
