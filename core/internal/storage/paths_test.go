package storage_test

import (
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/storage"
)

// longestPath is a path of MaxPathBytes bytes.
var longestPath = strings.Repeat(strings.Repeat("x", 99)+"/", 9) + strings.Repeat("y", storage.MaxPathBytes-900)

// BadPaths are the inputs of the issue and their kin, with the code
// CleanPath answers; the REST tests send the same through every route.
var BadPaths = []struct {
	Name, Path string
	Code       errcode.Code
}{
	{"dot dot", "../x", storage.CodePathTraversal},
	{"dot dot, encoded slash", "..%2fx", storage.CodePathTraversal},
	{"dot dot, encoded slash upper case", "..%2Fx", storage.CodePathTraversal},
	{"encoded dots", "%2e%2e/", storage.CodePathTraversal},
	{"encoded dots and slash", "%2e%2e%2fetc", storage.CodePathTraversal},
	{"double-encoded", "%252e%252e%252fx", storage.CodePathTraversal},
	{"overlong UTF-8 dot", "%c0%ae%c0%ae/x", storage.CodePathTraversal},
	{"climbs out midway", "a/../../b", storage.CodePathTraversal},
	{"dot segment", "a/./b", storage.CodePathTraversal},
	{"trailing dot dot", "a/..", storage.CodePathTraversal},
	{"absolute", "/abs", storage.CodePathTraversal},
	{"encoded absolute", "%2fabs", storage.CodePathTraversal},
	{"backslashes", `a\..\b`, storage.CodePathTraversal},
	{"encoded backslash", "a%5cb", storage.CodePathTraversal},
	{"fullwidth dots", "\uFF0E\uFF0E/x", storage.CodePathTraversal},
	{"fullwidth dots and solidus", "a/\uFF0E\uFF0E\uFF0Fb", storage.CodePathTraversal},
	{"two dot leader", "\u2025/x", storage.CodePathTraversal},
	{"NUL", "a\x00b", storage.CodeInvalidKey},
	{"encoded NUL", "a%00b", storage.CodeInvalidKey},
	{"newline", "a\nb", storage.CodeInvalidKey},
	{"DEL", "a\x7fb", storage.CodeInvalidKey},
	{"C1 control", "a\u0085b", storage.CodeInvalidKey},
	{"RTL override", "invoice\u202Efdp.exe", storage.CodeInvalidKey},
	{"RTL isolate", "a\u2067b", storage.CodeInvalidKey},
	{"byte order mark", "\uFEFFa", storage.CodeInvalidKey},
	{"invalid UTF-8", "a\xffb", storage.CodeInvalidKey},
	{"1025-byte key", strings.Repeat("a/", 512) + "b", storage.CodeInvalidKey},
	{"just over the limit", longestPath + "z", storage.CodeInvalidKey},
	{"long segment", strings.Repeat("s", storage.MaxSegmentBytes+1), storage.CodeInvalidKey},
	{"empty", "", storage.CodeInvalidKey},
	{"empty segment", "a//b", storage.CodeInvalidKey},
	{"only a slash", "/", storage.CodePathTraversal},
}

func TestCleanPathRefuses(t *testing.T) {
	t.Parallel()
	for _, c := range BadPaths {
		t.Run(c.Name, func(t *testing.T) {
			t.Parallel()
			for _, kind := range []storage.Kind{storage.File, storage.FileOrFolder} {
				got, err := storage.CleanPath(c.Path, kind)
				if errcode.Of(err) != c.Code {
					t.Errorf("CleanPath(%q, %d) = %q, %v; want %s", c.Path, kind, got, err, c.Code)
				}
			}
		})
	}
}

func TestCleanPathAccepts(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name, path string
		kind       storage.Kind
		want       string
	}{
		{"file", "reports/q1.csv", storage.File, "reports/q1.csv"},
		{"dots inside names", "a..b/.hidden/v1.2..3", storage.File, "a..b/.hidden/v1.2..3"},
		{"three dots", ".../x", storage.File, ".../x"},
		{"percent in a name", "100%.txt", storage.File, "100%.txt"},
		{"encoded space stays literal", "a%20b", storage.File, "a%20b"},
		{"spaces and unicode", "Ünïcødé dir/résumé 📄.pdf", storage.File, "Ünïcødé dir/résumé 📄.pdf"},
		{"NFD becomes NFC", "re\u0301sume\u0301.pdf", storage.File, "r\u00e9sum\u00e9.pdf"},
		{"emoji with joiners", "👩\u200d👩\u200d👧.png", storage.File, "👩\u200d👩\u200d👧.png"},
		{"longest path", longestPath, storage.File, longestPath},
		{"folder gets its slash", "a/b", storage.Folder, "a/b/"},
		{"folder keeps its slash", "a/b/", storage.Folder, "a/b/"},
		{"prefix p1 never matches p10", "p1", storage.Prefix, "p1/"},
		{"root prefix", "", storage.Prefix, ""},
		{"entry file", "a/b", storage.FileOrFolder, "a/b"},
		{"entry folder", "a/b/", storage.FileOrFolder, "a/b/"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := storage.CleanPath(c.path, c.kind)
			if err != nil || got != c.want {
				t.Errorf("CleanPath(%q) = %q, %v; want %q", c.path, got, err, c.want)
			}
		})
	}
	if _, err := storage.CleanPath("a/b/", storage.File); errcode.Of(err) != storage.CodeInvalidKey {
		t.Errorf("a folder path where a file is expected: %v, want %s", err, storage.CodeInvalidKey)
	}
	if _, err := storage.CleanPath("", storage.Folder); errcode.Of(err) != storage.CodeInvalidKey {
		t.Errorf("an empty folder path: %v, want %s", err, storage.CodeInvalidKey)
	}
}

// CleanPath is idempotent: a clean path passes again unchanged.
func FuzzCleanPath(f *testing.F) {
	for _, c := range BadPaths {
		f.Add(c.Path)
	}
	f.Add("reports/q1.csv")
	f.Add("re\u0301sume\u0301/")
	f.Fuzz(func(t *testing.T, raw string) {
		p, err := storage.CleanPath(raw, storage.FileOrFolder)
		if err != nil {
			return
		}
		again, err := storage.CleanPath(p, storage.FileOrFolder)
		if err != nil || again != p {
			t.Fatalf("CleanPath(%q) = %q, but CleanPath(%q) = %q, %v", raw, p, p, again, err)
		}
		for _, seg := range strings.Split(strings.TrimSuffix(p, "/"), "/") {
			if seg == "" || seg == "." || seg == ".." {
				t.Fatalf("CleanPath(%q) = %q has a %q segment", raw, p, seg)
			}
		}
		if strings.HasPrefix(p, "/") || strings.ContainsRune(p, '\\') || len(p) > storage.MaxPathBytes {
			t.Fatalf("CleanPath(%q) = %q", raw, p)
		}
	})
}
