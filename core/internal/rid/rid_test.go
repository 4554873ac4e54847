package rid_test

import (
	"testing"

	"github.com/gpuaas/gpuaas/core/internal/rid"
)

func TestRoundTrip(t *testing.T) {
	b := rid.Builder{Region: "eu-1"}
	for _, id := range []rid.ID{
		b.User("u1"), b.Org("o1"), b.Project("o1", "p1"), b.InProject("o1", "p1", "allocation", "a1"), b.Platform("policy", "outbox.max_attempts"),
	} {
		got, err := rid.Parse(id.String())
		if err != nil || got != id {
			t.Fatalf("Parse(%q) = %+v, %v", id.String(), got, err)
		}
	}
	if s := b.InProject("o1", "p1", "allocation", "a1").String(); s != "gpuaas:eu-1:o1:p1:allocation:a1" {
		t.Fatalf("format %q", s)
	}
}

func TestParseRejects(t *testing.T) {
	for _, s := range []string{"", "gpuaas:eu:o:p:t", "core42:eu:o:p:t:i", "gpuaas::o:p:t:i", "gpuaas:eu:o:p:Type:i", "gpuaas:eu:o:p:t:", "gpuaas:eu::p:t:i", "gpuaas:eu:o/x:p:t:i"} {
		if _, err := rid.Parse(s); err == nil {
			t.Errorf("Parse(%q) accepted", s)
		}
	}
}
