package httpapi

import (
	"encoding/base64"
	"encoding/json"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// Page size bounds shared by every list route.
const (
	DefaultLimit = 50
	MaxLimit     = 200
)

// Limit validates an optional limit parameter.
func Limit(p *int) (int, error) {
	if p == nil {
		return DefaultLimit, nil
	}
	if *p < 1 || *p > MaxLimit {
		return 0, errcode.New(errcode.ValidationFailed, "limit must be between 1 and %d", MaxLimit).WithDetails("field", "limit")
	}
	return *p, nil
}

// EncodeCursor makes an opaque cursor from the sort key of the last item of a page.
func EncodeCursor(v any) string {
	b, _ := json.Marshal(v)
	return base64.RawURLEncoding.EncodeToString(b)
}

// DecodeCursor reads a cursor made by EncodeCursor into v. An absent cursor leaves v
// untouched and returns false.
func DecodeCursor(p *string, v any) (bool, error) {
	if p == nil || *p == "" {
		return false, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(*p)
	if err != nil || json.Unmarshal(b, v) != nil {
		return false, errcode.New(errcode.InvalidCursor, "cursor is not valid; pass next_cursor from a previous page").WithDetails("field", "cursor")
	}
	return true, nil
}

// Page cuts a result of up to limit+1 items (the store reads one more than the page
// to know whether another follows) to at most limit items, converted by conv, and
// the cursor of the next page (nil on the last), made from the sort key of the last
// item kept.
func Page[T, J any](items []T, limit int, key func(T) any, conv func(T) J) ([]J, *string) {
	out := make([]J, 0, min(len(items), limit))
	for i, it := range items {
		if i == limit {
			next := EncodeCursor(key(items[i-1]))
			return out, &next
		}
		out = append(out, conv(it))
	}
	return out, nil
}
