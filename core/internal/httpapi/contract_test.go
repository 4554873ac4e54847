package httpapi_test

import (
	"sort"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// The app serves exactly the routes of api/openapi.yaml: a route added to the code
// but not to the contract (or the reverse) fails here.
func TestRoutesMatchContract(t *testing.T) {
	spec, err := apigen.GetSpec()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	for path, item := range spec.Paths.Map() {
		for method := range item.Operations() {
			want[method+" "+httpapi.FiberPath(path)] = true
		}
	}
	reg := prometheus.NewRegistry()
	app := httpapi.New(testenv.Logger(t), &httpapi.API{Gatherer: reg}, httpapi.Options{Registerer: reg})
	got := map[string]bool{}
	for _, r := range app.GetRoutes(true) {
		if r.Method == "HEAD" || r.Method == "USE" || r.Path == "/" {
			continue
		}
		got[r.Method+" "+r.Path] = true
	}
	var missing, extra []string
	for k := range want {
		if !got[k] {
			missing = append(missing, k)
		}
	}
	for k := range got {
		if !want[k] {
			extra = append(extra, k)
		}
	}
	sort.Strings(missing)
	sort.Strings(extra)
	if len(missing)+len(extra) > 0 {
		t.Fatalf("routes in the contract but not served: %v\nroutes served but not in the contract: %v", missing, extra)
	}
}

// Every code the server can emit is declared in the contract's ErrorCode enum.
func TestErrorCodesInContract(t *testing.T) {
	spec, err := apigen.GetSpec()
	if err != nil {
		t.Fatal(err)
	}
	declared := map[string]bool{}
	for _, v := range spec.Components.Schemas["ErrorCode"].Value.Enum {
		declared[v.(string)] = true
	}
	for _, code := range httpapi.Codes() {
		if !declared[string(code)] {
			t.Errorf("error code %q is emitted but not listed in api/openapi.yaml ErrorCode", code)
		}
	}
}
