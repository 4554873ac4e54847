package base_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
)

func testSchema() *base.ConfigSchema {
	return &base.ConfigSchema{Fields: []base.Field{
		{Name: "url", Type: base.TypeURL, Required: true, Description: "API endpoint"},
		{Name: "token", Type: base.TypeSecret, Required: true, Description: "API token"},
		{Name: "retries", Type: base.TypeInt, Default: 3, Description: "retries"},
		{Name: "verbose", Type: base.TypeBool, Default: false, Description: "verbose"},
		{Name: "timeout", Type: base.TypeDuration, Default: "30s", Description: "timeout"},
		{Name: "zones", Type: base.TypeStringList, Description: "zones"},
		{Name: "region", Type: base.TypeString, Description: "region"},
		{Name: "dsn", Type: base.TypeString, Sensitive: true, Description: "database"},
	}}
}

func TestValidateConfig(t *testing.T) {
	t.Parallel()
	valid := func() map[string]any {
		return map[string]any{"url": "https://maas.example:5240/MAAS", "token": "s3cr3t"}
	}
	for _, c := range []struct {
		name   string
		patch  func(m map[string]any)
		field  string
		reason string
	}{
		{"missing required", func(m map[string]any) { delete(m, "url") }, "url", "required"},
		{"null required", func(m map[string]any) { m["token"] = nil }, "token", "required"},
		{"empty required string", func(m map[string]any) { m["token"] = "" }, "token", "required"},
		{"string for int", func(m map[string]any) { m["retries"] = "three" }, "retries", "want int, got string"},
		{"fraction for int", func(m map[string]any) { m["retries"] = 2.5 }, "retries", "want int, got number"},
		{"int for bool", func(m map[string]any) { m["verbose"] = 1 }, "verbose", "want bool, got int"},
		{"bad duration", func(m map[string]any) { m["timeout"] = "soon" }, "timeout", `not a duration: "soon"`},
		{"number for duration", func(m map[string]any) { m["timeout"] = 30 }, "timeout", "want duration, got int"},
		{"relative url", func(m map[string]any) { m["url"] = "/MAAS" }, "url", "not an absolute URL"},
		{"list with a number", func(m map[string]any) { m["zones"] = []any{"a", 1} }, "zones", "want string_list, got array with int"},
		{"string for list", func(m map[string]any) { m["zones"] = "a" }, "zones", "want string_list, got string"},
		{"unknown field", func(m map[string]any) { m["colour"] = "blue" }, "colour", "unknown field"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			raw := valid()
			c.patch(raw)
			_, err := base.ValidateConfig(testSchema(), raw)
			var cfgErr *base.ConfigError
			if !errors.As(err, &cfgErr) {
				t.Fatalf("got %v, want a *ConfigError", err)
			}
			if cfgErr.Field != c.field || !strings.Contains(cfgErr.Reason, c.reason) {
				t.Errorf("got %v, want field %q with %q", err, c.field, c.reason)
			}
			if !errors.Is(err, base.ErrInvalidArgument) {
				t.Errorf("%v does not match ErrInvalidArgument", err)
			}
			if want := fmt.Sprintf("config field %q: ", c.field); !strings.HasPrefix(err.Error(), want) {
				t.Errorf("message %q does not start with %q", err.Error(), want)
			}
		})
	}

	t.Run("defaults and typed getters", func(t *testing.T) {
		t.Parallel()
		raw := valid()
		raw["zones"] = []any{"a", "b"}
		cfg, err := base.ValidateConfig(testSchema(), raw)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Int("retries") != 3 || cfg.Bool("verbose") || cfg.Duration("timeout") != 30*time.Second {
			t.Errorf("defaults not applied: %v", cfg.Values())
		}
		if u := cfg.URL("url"); u == nil || u.Host != "maas.example:5240" {
			t.Errorf("URL = %v", u)
		}
		if z := cfg.Strings("zones"); len(z) != 2 || z[1] != "b" {
			t.Errorf("Strings = %v", z)
		}
		if cfg.Has("region") || cfg.String("region") != "" {
			t.Error("an absent optional field without default has a value")
		}
	})

	t.Run("json numbers", func(t *testing.T) {
		t.Parallel()
		cfg, err := base.ValidateConfigJSON(testSchema(), []byte(`{"url":"https://x.example","token":"t","retries":7}`))
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Int("retries") != 7 {
			t.Errorf("retries = %d", cfg.Int("retries"))
		}
		_, err = base.ValidateConfigJSON(testSchema(), []byte(`[1,2]`))
		if !errors.Is(err, base.ErrInvalidArgument) {
			t.Errorf("a JSON array: got %v", err)
		}
	})

	t.Run("secrets never print", func(t *testing.T) {
		t.Parallel()
		raw := valid()
		raw["dsn"] = "postgres://u:hunter2@db/x"
		cfg, err := base.ValidateConfig(testSchema(), raw)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []string{fmt.Sprint(cfg), fmt.Sprintf("%v", *cfg), fmt.Sprintf("%+v", cfg), fmt.Sprintf("%#v", cfg), fmt.Sprintf("%s", cfg)} {
			if strings.Contains(s, "s3cr3t") || strings.Contains(s, "hunter2") {
				t.Errorf("printed config leaks a secret: %s", s)
			}
			if !strings.Contains(s, "maas.example") {
				t.Errorf("printed config lost a plain value: %s", s)
			}
		}
		if got := testSchema().SecretFields(); strings.Join(got, ",") != "token,dsn" {
			t.Errorf("SecretFields = %v", got)
		}
	})
}

func TestSchemaValidate(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name   string
		fields []base.Field
		want   string
	}{
		{"ok", []base.Field{{Name: "a_1", Type: base.TypeString}}, ""},
		{"bad name", []base.Field{{Name: "Bad-Name", Type: base.TypeString}}, "does not match"},
		{"duplicate", []base.Field{{Name: "a", Type: base.TypeString}, {Name: "a", Type: base.TypeInt}}, "declared twice"},
		{"unknown type", []base.Field{{Name: "a", Type: "float"}}, "unknown type"},
		{"required with default", []base.Field{{Name: "a", Type: base.TypeInt, Required: true, Default: 1}}, "required field has a default"},
		{"secret with default", []base.Field{{Name: "a", Type: base.TypeSecret, Default: "x"}}, "secret field has a default"},
		{"default of the wrong type", []base.Field{{Name: "a", Type: base.TypeInt, Default: "x"}}, "want int"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			err := (&base.ConfigSchema{Fields: c.fields}).Validate()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("got %v", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Fatalf("got %v, want an error with %q", err, c.want)
			}
		})
	}
}

func TestNegotiateAPIVersion(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name         string
		host, plugin []string
		want         string
	}{
		{"single", []string{"1.0"}, []string{"1.0"}, "1.0"},
		{"highest common", []string{"1.0", "1.1", "2.0"}, []string{"1.1", "1.0", "3.0"}, "1.1"},
		{"numeric order", []string{"1.9", "1.10"}, []string{"1.9", "1.10"}, "1.10"},
		{"unparsable ignored", []string{"x", "1.0"}, []string{"x", "1.0"}, "1.0"},
		{"no overlap", []string{"1.0"}, []string{"2.0"}, ""},
		{"plugin lists none", []string{"1.0"}, nil, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			got, err := base.NegotiateAPIVersion(c.host, c.plugin)
			if c.want == "" {
				var inc *base.IncompatibleError
				if !errors.As(err, &inc) || !errors.Is(err, base.ErrIncompatibleAPIVersion) {
					t.Fatalf("got %q, %v; want an *IncompatibleError", got, err)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("got %q, %v; want %q", got, err, c.want)
			}
		})
	}
}
