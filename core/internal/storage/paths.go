package storage

import (
	"net/url"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// Kind says what a path a caller passes names.
type Kind int

const (
	// File is an object: it never ends in '/'.
	File Kind = iota
	// Folder is a folder: it always ends in '/' (added when missing) and is
	// never the root.
	Folder
	// Prefix is where a listing looks: "" (the root) or a folder.
	Prefix
	// FileOrFolder is a file or a folder, told apart by a trailing '/'.
	FileOrFolder
)

// Limits of a path inside a project. A full key is
// orgs/{org}/projects/{project}/{path}: 88 bytes before the path, and S3
// allows 1024.
const (
	keyPrefixBytes  = len("orgs/") + 36 + len("/projects/") + 36 + len("/")
	MaxPathBytes    = 1024 - keyPrefixBytes
	MaxSegmentBytes = 255 // a file name on the stores that keep objects as files
)

// decodeRounds bounds how many layers of percent-encoding CleanPath looks
// through for a hidden "..".
const decodeRounds = 4

// CleanPath is the one check every storage route runs on a path a caller
// sends. It returns the path NFC-normalised, a folder or prefix ending in
// '/', or a 400:
//
//   - storage_path_traversal: a "." or ".." segment, a leading '/', or a
//     backslash — as sent, behind any layer of percent-encoding, or behind
//     compatibility characters that fold to them (fullwidth dots and
//     solidus, one- and two-dot leaders);
//   - invalid_object_key: invalid UTF-8, NUL and other control characters
//     (also percent-encoded), bidirectional overrides and isolates, empty
//     segments, a segment over 255 bytes, a path over MaxPathBytes, an
//     empty path, or a trailing '/' where a file is expected.
//
// The path kept is the one sent (normalised): percent signs in it are
// part of the name.
func CleanPath(raw string, kind Kind) (string, error) {
	if !utf8.ValidString(raw) {
		return "", invalidKey("the path is not valid UTF-8")
	}
	if raw == "" {
		if kind == Prefix {
			return "", nil
		}
		return "", invalidKey("the path is empty")
	}
	// Every form the path may take on its way to a file system or another
	// client: as sent, percent-decoded (repeatedly), and folded by NFKC.
	forms := []string{raw}
	for cur, i := raw, 0; i < decodeRounds; i++ {
		dec, err := url.PathUnescape(cur)
		if err != nil || dec == cur {
			break
		}
		if !utf8.ValidString(dec) {
			// Overlong and other invalid sequences (%c0%ae is a '.')
			// exist to slip past checks like this one.
			return "", traversal("the path percent-decodes to invalid UTF-8")
		}
		forms = append(forms, dec)
		cur = dec
	}
	for _, f := range forms {
		if err := checkForm(f); err != nil {
			return "", err
		}
		if folded := norm.NFKC.String(f); folded != f {
			if err := checkForm(folded); err != nil {
				return "", err
			}
		}
	}
	p := norm.NFC.String(raw)
	if err := checkForm(p); err != nil {
		return "", err
	}
	switch kind {
	case File:
		if strings.HasSuffix(p, "/") {
			return "", invalidKey("the path names a folder (it ends in '/'); a file is expected")
		}
	case Folder, Prefix:
		if !strings.HasSuffix(p, "/") {
			p += "/"
		}
	}
	if len(p) > MaxPathBytes {
		return "", invalidKey("the path is longer than %d bytes", MaxPathBytes)
	}
	for _, seg := range strings.Split(strings.TrimSuffix(p, "/"), "/") {
		switch {
		case seg == "":
			return "", invalidKey("the path has an empty segment ('//')")
		case len(seg) > MaxSegmentBytes:
			return "", invalidKey("a segment of the path is longer than %d bytes", MaxSegmentBytes)
		}
	}
	return p, nil
}

// checkForm refuses one form of a path.
func checkForm(f string) error {
	if strings.HasPrefix(f, "/") {
		return traversal("the path is absolute (it starts with '/'); paths are relative to the project")
	}
	if strings.ContainsRune(f, '\\') {
		return traversal("the path has a backslash")
	}
	for _, seg := range strings.Split(f, "/") {
		if seg == "." || seg == ".." {
			return traversal("the path has a %q segment", seg)
		}
	}
	for _, r := range f {
		switch {
		case unicode.IsControl(r):
			return invalidKey("the path has a control character (U+%04X)", r)
		case unicode.Is(unicode.Bidi_Control, r):
			return invalidKey("the path has a bidirectional control character (U+%04X)", r)
		case r == '\uFEFF':
			return invalidKey("the path has a byte order mark (U+FEFF)")
		}
	}
	return nil
}

func traversal(format string, args ...any) error {
	return errcode.New(CodePathTraversal, format, args...)
}

func invalidKey(format string, args ...any) error {
	return errcode.New(CodeInvalidKey, format, args...)
}

// objectKey is the bucket key of path in a project.
func objectKey(p Project, path string) string {
	return projectPrefix(p) + path
}

// projectPrefix is where a project's objects live in the bucket.
func projectPrefix(p Project) string {
	return "orgs/" + p.OrgID.String() + "/projects/" + p.ID.String() + "/"
}
