package httpapi

import (
	"testing"

	"github.com/gpuaas/gpuaas/core/internal/principal"
)

func TestDefaultUsername(t *testing.T) {
	cases := map[string]string{
		"ada.lovelace@example.com": "ada-lovelace",
		"Ada_Lovelace@example.com": "ada_lovelace",
		"42bob@example.com":        "bob",
		"root@example.com":         "tenant",
		"ubuntu@example.com":       "tenant",
		"---@example.com":          "tenant",
		"":                         "tenant",
		"x.@example.com":           "x",
		"ünïcode@example.com":      "ncode",
		"a.very.long.local.part.that.goes.on.and.on@example.com": "a-very-long-local-part-that-goe",
	}
	for email, want := range cases {
		if got := defaultUsername(&principal.Principal{Email: email}); got != want {
			t.Errorf("defaultUsername(%q) = %q; want %q", email, got, want)
		}
	}
}
