package sdktest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
)

var driverNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]*$`)

// checkInfo checks what every driver reports about itself.
func checkInfo(t *testing.T, d base.BasePlugin, kind base.Kind, hostVersions, knownCaps []string) *base.Info {
	t.Helper()
	info, err := d.Info(testContext(t))
	wantOK(t, "Info", err)
	if !driverNameRE.MatchString(info.Name) {
		t.Errorf("Info.Name %q does not match %s", info.Name, driverNameRE)
	}
	if info.Kind != kind {
		t.Errorf("Info.Kind = %q, want %q", info.Kind, kind)
	}
	if strings.TrimSpace(info.DriverVersion) == "" {
		t.Error("Info.DriverVersion is empty")
	}
	if len(info.APIVersions) == 0 {
		t.Error("Info.APIVersions is empty")
	}
	for _, v := range info.APIVersions {
		if _, err := base.ParseAPIVersion(v); err != nil {
			t.Errorf("Info.APIVersions: %v", err)
		}
	}
	if _, err := base.NegotiateAPIVersion(hostVersions, info.APIVersions); err != nil {
		t.Errorf("negotiating with this SDK: %v", err)
	}
	seen := map[string]bool{}
	for _, c := range info.Capabilities {
		if !slices.Contains(knownCaps, c) {
			t.Errorf("Info.Capabilities has %q, not a %s capability (%v)", c, kind, knownCaps)
		}
		if seen[c] {
			t.Errorf("Info.Capabilities lists %q twice", c)
		}
		seen[c] = true
	}
	return info
}

// checkSchema checks the driver's configuration schema and that the
// suite's configuration satisfies it.
func checkSchema(t *testing.T, d base.BasePlugin, valid map[string]any) *base.ConfigSchema {
	t.Helper()
	schema, err := d.ConfigSchema(testContext(t))
	wantOK(t, "ConfigSchema", err)
	if err := schema.Validate(); err != nil {
		t.Fatalf("ConfigSchema: %v", err)
	}
	for i := range schema.Fields {
		if strings.TrimSpace(schema.Fields[i].Description) == "" {
			t.Errorf("config field %q has no description", schema.Fields[i].Name)
		}
	}
	if _, err := base.ValidateConfig(schema, valid); err != nil {
		t.Fatalf("the suite's Config does not satisfy the schema: %v", err)
	}
	return schema
}

// wrongTypeValue is a value of the wrong type for a field.
func wrongTypeValue(f *base.Field) any {
	switch f.Type {
	case base.TypeInt:
		return "not-an-int"
	case base.TypeBool:
		return "not-a-bool"
	case base.TypeStringList:
		return 7
	}
	return 12345
}

// checkConfigValidation sends broken configurations to the plugin,
// unvalidated, and checks that each is refused naming the field, and that
// the host-side validation (base.ValidateConfig) names the same field.
func checkConfigValidation(t *testing.T, d configurer, schema *base.ConfigSchema, version string, valid map[string]any) {
	t.Helper()
	type tc struct {
		name  string
		raw   map[string]any
		field string
	}
	var cases []tc
	clone := func() map[string]any {
		m := make(map[string]any, len(valid))
		for k, v := range valid {
			m[k] = v
		}
		return m
	}
	for i := range schema.Fields {
		f := &schema.Fields[i]
		if f.Required {
			raw := clone()
			delete(raw, f.Name)
			cases = append(cases, tc{name: "missing " + f.Name, raw: raw, field: f.Name})
		}
		raw := clone()
		raw[f.Name] = wrongTypeValue(f)
		cases = append(cases, tc{name: "wrong type " + f.Name, raw: raw, field: f.Name})
	}
	unknown := clone()
	unknown["sdktest_no_such_field"] = "x"
	cases = append(cases, tc{name: "unknown field", raw: unknown, field: "sdktest_no_such_field"})

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, hostErr := base.ValidateConfig(schema, c.raw)
			var hostCfgErr *base.ConfigError
			if !errors.As(hostErr, &hostCfgErr) || hostCfgErr.Field != c.field {
				t.Errorf("base.ValidateConfig: got %v, want a *base.ConfigError for field %q", hostErr, c.field)
			}
			body, err := json.Marshal(c.raw)
			wantOK(t, "encoding the config", err)
			err = d.ConfigureJSON(testContext(t), version, "sdktest", body)
			var cfgErr *base.ConfigError
			if !errors.As(err, &cfgErr) {
				t.Fatalf("Configure: got %v, want a *base.ConfigError", err)
			}
			if cfgErr.Field != c.field {
				t.Errorf("Configure: error names field %q, want %q (%v)", cfgErr.Field, c.field, err)
			}
			if !errors.Is(err, base.ErrInvalidArgument) {
				t.Errorf("Configure: %v does not match base.ErrInvalidArgument", err)
			}
			if want := fmt.Sprintf("config field %q", c.field); !strings.Contains(err.Error(), want) {
				t.Errorf("Configure: message %q does not contain %q", err.Error(), want)
			}
		})
	}
	t.Run("unknown api version", func(t *testing.T) {
		body, err := json.Marshal(valid)
		wantOK(t, "encoding the config", err)
		err = d.ConfigureJSON(testContext(t), "0.0", "sdktest", body)
		wantErr(t, "Configure with api version 0.0", err, base.ErrInvalidArgument)
	})
}

// runBaseChecks runs the checks every kind shares and leaves d configured
// with the suite's configuration.
func runBaseChecks(t *testing.T, d configurer, kind base.Kind, hostVersions, knownCaps []string, valid map[string]any) *base.Info {
	t.Helper()
	var info *base.Info
	var schema *base.ConfigSchema
	ok := t.Run("info", func(t *testing.T) {
		info = checkInfo(t, d, kind, hostVersions, knownCaps)
	})
	ok = t.Run("config schema", func(t *testing.T) {
		schema = checkSchema(t, d, valid)
	}) && ok
	if !ok {
		t.FailNow()
	}
	version, err := base.NegotiateAPIVersion(hostVersions, info.APIVersions)
	wantOK(t, "negotiate", err)
	t.Run("config validation", func(t *testing.T) {
		checkConfigValidation(t, d, schema, version, valid)
	})
	t.Run("configure twice", func(t *testing.T) {
		Configure(t, d, hostVersions, valid)
		Configure(t, d, hostVersions, valid)
	})
	return info
}

// injector makes a wrapped driver call fail with a chosen error, or block
// until its context ends.
type injector struct {
	mu       sync.Mutex
	err      error
	block    bool
	observed chan error
}

func newInjector() *injector { return &injector{observed: make(chan error, 1)} }

func (i *injector) set(err error, block bool) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.err, i.block = err, block
}

// hit is what the wrapped call does.
func (i *injector) hit(ctx context.Context) error {
	i.mu.Lock()
	err, block := i.err, i.block
	i.mu.Unlock()
	if !block {
		return err
	}
	<-ctx.Done()
	i.observed <- ctx.Err()
	return fmt.Errorf("sdktest: blocked call: %w", ctx.Err())
}

// checkErrorMapping makes the driver behind call fail with every sentinel
// (through inj) and checks what the host sees: the sentinel, the message,
// a *base.ConfigError's field, and cancellation reaching the driver.
func checkErrorMapping(t *testing.T, inj *injector, call func(ctx context.Context) error) {
	t.Helper()
	names := map[error]string{}
	for _, s := range base.Sentinels() {
		names[s] = s.Error()
	}
	for _, sentinel := range base.Sentinels() {
		t.Run(names[sentinel], func(t *testing.T) {
			msg := "sdktest injected failure"
			inj.set(fmt.Errorf("%s: %w", msg, sentinel), false)
			err := call(testContext(t))
			if !errors.Is(err, sentinel) {
				t.Fatalf("got %v, want an error matching %q", err, sentinel)
			}
			if !strings.Contains(err.Error(), msg+": "+sentinel.Error()) {
				t.Errorf("message %q lost the driver's message %q", err.Error(), msg+": "+sentinel.Error())
			}
			for _, other := range base.Sentinels() {
				if other != sentinel && errors.Is(err, other) {
					t.Errorf("%v also matches %q", err, other)
				}
			}
		})
	}
	t.Run("config error", func(t *testing.T) {
		inj.set(&base.ConfigError{Field: "zone", Reason: "no such zone"}, false)
		err := call(testContext(t))
		var cfgErr *base.ConfigError
		if !errors.As(err, &cfgErr) || cfgErr.Field != "zone" || cfgErr.Reason != "no such zone" {
			t.Fatalf("got %v, want *base.ConfigError{zone, no such zone}", err)
		}
		wantErr(t, "config error", err, base.ErrInvalidArgument)
	})
	t.Run("plain error", func(t *testing.T) {
		inj.set(errors.New("sdktest plain failure"), false)
		err := call(testContext(t))
		if err == nil || !strings.Contains(err.Error(), "sdktest plain failure") {
			t.Fatalf("got %v, want the driver's message", err)
		}
		for _, s := range base.Sentinels() {
			if errors.Is(err, s) {
				t.Errorf("%v matches %q", err, s)
			}
		}
	})
	for _, c := range []struct {
		name string
		ctx  func() (context.Context, context.CancelFunc)
		want error
	}{
		{"cancel reaches the driver", func() (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(200*time.Millisecond, cancel)
			return ctx, cancel
		}, context.Canceled},
		{"deadline reaches the driver", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 200*time.Millisecond)
		}, context.DeadlineExceeded},
	} {
		t.Run(c.name, func(t *testing.T) {
			inj.set(nil, true)
			defer inj.set(nil, false)
			ctx, cancel := c.ctx()
			defer cancel()
			start := time.Now()
			err := call(ctx)
			wantErr(t, "host side", err, c.want)
			if d := time.Since(start); d > promptly {
				t.Errorf("the call took %s", d)
			}
			select {
			case got := <-inj.observed:
				// The host's expiry may reach the driver as a cancel: the
				// host resets the stream before the driver's own copy of
				// the deadline passes.
				if !errors.Is(got, c.want) && !errors.Is(got, context.Canceled) {
					t.Errorf("the driver saw %v, want %v", got, c.want)
				}
			case <-time.After(promptly):
				t.Fatal("the driver's context was not ended")
			}
		})
	}
}
