package httpapi

import (
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/storage"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

func TestByteRange(t *testing.T) {
	mod := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	o := &storage.Object{Size: 1000, ETag: "abc", UpdatedAt: mod.Add(300 * time.Millisecond)}
	whole := (*sdkstorage.Range)(nil)
	r := func(off, n int64) *sdkstorage.Range { return &sdkstorage.Range{Offset: off, Length: n} }
	for _, c := range []struct {
		header, ifRange string
		want            *sdkstorage.Range
		unsatisfiable   bool
	}{
		{"", "", whole, false},
		{"bytes=0-0", "", r(0, 1), false},
		{"bytes=0-999", "", r(0, 1000), false},
		{"bytes=10-", "", r(10, sdkstorage.ToEnd), false},
		{"bytes=990-2000", "", r(990, 1011), false},
		{"bytes=-10", "", r(990, 10), false},
		{"bytes=-5000", "", r(0, 1000), false},
		{" Bytes = 5-6 ", "", r(5, 2), false},
		{"bytes=1000-", "", nil, true},
		{"bytes=1000-1001", "", nil, true},
		{"bytes=-0", "", nil, true},
		{"bytes=0-1,5-6", "", whole, false},
		{"bytes=5-4", "", whole, false},
		{"bytes=a-b", "", whole, false},
		{"bytes=+1-2", "", whole, false},
		{"bytes=-", "", whole, false},
		{"items=0-1", "", whole, false},
		{"bytes=99999999999999999999-", "", whole, false},
		{"bytes=1-2", `"abc"`, r(1, 2), false},
		{"bytes=1-2", `"other"`, whole, false},
		{"bytes=1-2", `W/"abc"`, whole, false},
		{"bytes=1-2", mod.Format("Mon, 02 Jan 2006 15:04:05 GMT"), r(1, 2), false},
		{"bytes=1-2", mod.Add(-time.Second).Format("Mon, 02 Jan 2006 15:04:05 GMT"), whole, false},
		{"bytes=1-2", "not a date", whole, false},
	} {
		got, err := byteRange(c.header, c.ifRange, o)
		if c.unsatisfiable {
			if errcode.Of(err) != storage.CodeRangeNotSatisfied {
				t.Errorf("Range %q: %v, %v; want %s", c.header, got, err, storage.CodeRangeNotSatisfied)
			}
			continue
		}
		if err != nil || (got == nil) != (c.want == nil) || (got != nil && *got != *c.want) {
			t.Errorf("Range %q If-Range %q: %+v, %v; want %+v", c.header, c.ifRange, got, err, c.want)
		}
	}
	if _, err := byteRange("bytes=0-", "", &storage.Object{Size: 0}); errcode.Of(err) != storage.CodeRangeNotSatisfied {
		t.Errorf("any range of an empty file: %v, want 416", err)
	}
}
