package base

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"time"
)

// FieldType is the type of one configuration field.
type FieldType string

// Field types. Values travel as JSON: string, url, secret and duration
// fields are JSON strings (durations in time.ParseDuration syntax), int
// fields are integral JSON numbers, bool fields JSON booleans and
// string_list fields arrays of strings.
const (
	TypeString     FieldType = "string"
	TypeInt        FieldType = "int"
	TypeBool       FieldType = "bool"
	TypeDuration   FieldType = "duration"
	TypeURL        FieldType = "url"
	TypeSecret     FieldType = "secret"
	TypeStringList FieldType = "string_list"
)

// FieldTypes lists every field type.
func FieldTypes() []FieldType {
	return []FieldType{TypeString, TypeInt, TypeBool, TypeDuration, TypeURL, TypeSecret, TypeStringList}
}

// Field describes one configuration field.
type Field struct {
	// Name is the key in the configuration object: [a-z][a-z0-9_]*.
	Name string
	Type FieldType
	// Required fields must be present; they have no default.
	Required bool
	// Default applies when an optional field is absent; nil means none.
	Default any
	// Description is shown to the operator.
	Description string
	// Sensitive marks a field of any type as secret. A TypeSecret field is
	// always secret. Secret values are encrypted at rest by the core, never
	// returned by its API and redacted when a Config is printed.
	Sensitive bool
}

// Secret reports whether the field's value is secret.
func (f *Field) Secret() bool { return f.Type == TypeSecret || f.Sensitive }

// ConfigSchema describes the configuration a driver accepts.
type ConfigSchema struct {
	Fields []Field
}

// Field returns the named field, or nil.
func (s *ConfigSchema) Field(name string) *Field {
	for i := range s.Fields {
		if s.Fields[i].Name == name {
			return &s.Fields[i]
		}
	}
	return nil
}

// SecretFields names the fields whose values are secret.
func (s *ConfigSchema) SecretFields() []string {
	var names []string
	for i := range s.Fields {
		if s.Fields[i].Secret() {
			names = append(names, s.Fields[i].Name)
		}
	}
	return names
}

var fieldNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

// Validate checks that the schema itself is well formed: names are valid
// and unique, types known, defaults of the field's type, no default on a
// required or secret field.
func (s *ConfigSchema) Validate() error {
	seen := make(map[string]bool, len(s.Fields))
	for i := range s.Fields {
		f := &s.Fields[i]
		if !fieldNameRE.MatchString(f.Name) {
			return fmt.Errorf("config schema: field %d: name %q does not match %s: %w", i, f.Name, fieldNameRE, ErrInvalidArgument)
		}
		if seen[f.Name] {
			return fmt.Errorf("config schema: field %q declared twice: %w", f.Name, ErrInvalidArgument)
		}
		seen[f.Name] = true
		if !validFieldType(f.Type) {
			return fmt.Errorf("config schema: field %q: unknown type %q: %w", f.Name, f.Type, ErrInvalidArgument)
		}
		if f.Default == nil {
			continue
		}
		if f.Required {
			return fmt.Errorf("config schema: field %q: required field has a default: %w", f.Name, ErrInvalidArgument)
		}
		if f.Secret() {
			return fmt.Errorf("config schema: field %q: secret field has a default: %w", f.Name, ErrInvalidArgument)
		}
		if _, err := normalize(f, f.Default); err != nil {
			return fmt.Errorf("config schema: default: %w", err)
		}
	}
	return nil
}

func validFieldType(t FieldType) bool {
	for _, known := range FieldTypes() {
		if t == known {
			return true
		}
	}
	return false
}

// ConfigError names the configuration field that failed validation. It
// matches ErrInvalidArgument with errors.Is and survives the plugin
// boundary: errors.As finds it on the host side too.
type ConfigError struct {
	Field  string
	Reason string
}

func (e *ConfigError) Error() string { return fmt.Sprintf("config field %q: %s", e.Field, e.Reason) }

// Unwrap makes a ConfigError an ErrInvalidArgument.
func (e *ConfigError) Unwrap() error { return ErrInvalidArgument }

// Config is a validated configuration: every value has its field's type
// and absent optional fields carry their defaults. Printing a Config
// redacts secret values.
type Config struct {
	// APIVersion is the driver API version the host negotiated.
	APIVersion string
	// Instance names the configured instance the process serves.
	Instance string

	values map[string]any
	secret map[string]bool
}

// ValidateConfig checks raw (as decoded from JSON, or built in Go) against
// the schema and returns the validated Config. The first offending field,
// in schema order and then unknown fields in name order, is reported as a
// *ConfigError.
func ValidateConfig(schema *ConfigSchema, raw map[string]any) (*Config, error) {
	cfg := &Config{values: make(map[string]any, len(schema.Fields)), secret: make(map[string]bool)}
	for i := range schema.Fields {
		f := &schema.Fields[i]
		if f.Secret() {
			cfg.secret[f.Name] = true
		}
		v, ok := raw[f.Name]
		if !ok || v == nil {
			if f.Required {
				return nil, &ConfigError{Field: f.Name, Reason: "required"}
			}
			if f.Default == nil {
				continue
			}
			v = f.Default
		}
		nv, err := normalize(f, v)
		if err != nil {
			return nil, err
		}
		if f.Required && f.Type != TypeBool && f.Type != TypeInt && isEmpty(nv) {
			return nil, &ConfigError{Field: f.Name, Reason: "required"}
		}
		cfg.values[f.Name] = nv
	}
	unknown := make([]string, 0)
	for name := range raw {
		if schema.Field(name) == nil {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return nil, &ConfigError{Field: unknown[0], Reason: "unknown field"}
	}
	return cfg, nil
}

// ValidateConfigJSON is ValidateConfig for a JSON object.
func ValidateConfigJSON(schema *ConfigSchema, data []byte) (*Config, error) {
	raw := map[string]any{}
	if len(bytes.TrimSpace(data)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.UseNumber()
		if err := dec.Decode(&raw); err != nil {
			return nil, fmt.Errorf("config: not a JSON object: %v: %w", err, ErrInvalidArgument)
		}
	}
	return ValidateConfig(schema, raw)
}

func isEmpty(v any) bool {
	switch v := v.(type) {
	case string:
		return v == ""
	case []string:
		return len(v) == 0
	}
	return false
}

// normalize converts v to the canonical Go form of the field's type:
// string (string, secret, url, duration), int64, bool or []string.
func normalize(f *Field, v any) (any, error) {
	wrong := func() error {
		return &ConfigError{Field: f.Name, Reason: fmt.Sprintf("want %s, got %s", f.Type, jsonType(v))}
	}
	switch f.Type {
	case TypeString, TypeSecret:
		s, ok := v.(string)
		if !ok {
			return nil, wrong()
		}
		return s, nil
	case TypeURL:
		s, ok := v.(string)
		if !ok {
			return nil, wrong()
		}
		u, err := url.Parse(s)
		if err != nil || u.Scheme == "" || u.Host == "" {
			return nil, &ConfigError{Field: f.Name, Reason: fmt.Sprintf("not an absolute URL: %q", s)}
		}
		return s, nil
	case TypeDuration:
		s, ok := v.(string)
		if !ok {
			if d, isDur := v.(time.Duration); isDur {
				return d.String(), nil
			}
			return nil, wrong()
		}
		if _, err := time.ParseDuration(s); err != nil {
			return nil, &ConfigError{Field: f.Name, Reason: fmt.Sprintf("not a duration: %q", s)}
		}
		return s, nil
	case TypeBool:
		b, ok := v.(bool)
		if !ok {
			return nil, wrong()
		}
		return b, nil
	case TypeInt:
		n, ok := toInt64(v)
		if !ok {
			return nil, wrong()
		}
		return n, nil
	case TypeStringList:
		switch l := v.(type) {
		case []string:
			return append([]string(nil), l...), nil
		case []any:
			out := make([]string, 0, len(l))
			for _, e := range l {
				s, ok := e.(string)
				if !ok {
					return nil, &ConfigError{Field: f.Name, Reason: fmt.Sprintf("want string_list, got array with %s", jsonType(e))}
				}
				out = append(out, s)
			}
			return out, nil
		}
		return nil, wrong()
	}
	return nil, &ConfigError{Field: f.Name, Reason: fmt.Sprintf("unknown type %q", f.Type)}
}

func toInt64(v any) (int64, bool) {
	switch n := v.(type) {
	case int:
		return int64(n), true
	case int8:
		return int64(n), true
	case int16:
		return int64(n), true
	case int32:
		return int64(n), true
	case int64:
		return n, true
	case uint8:
		return int64(n), true
	case uint16:
		return int64(n), true
	case uint32:
		return int64(n), true
	case uint:
		if uint64(n) > math.MaxInt64 {
			return 0, false
		}
		return int64(n), true
	case uint64:
		if n > math.MaxInt64 {
			return 0, false
		}
		return int64(n), true
	case float64:
		if n != math.Trunc(n) || n > math.MaxInt64 || n < math.MinInt64 {
			return 0, false
		}
		return int64(n), true
	case json.Number:
		i, err := n.Int64()
		return i, err == nil
	}
	return 0, false
}

func jsonType(v any) string {
	switch n := v.(type) {
	case nil:
		return "null"
	case string:
		return "string"
	case bool:
		return "bool"
	case json.Number:
		if _, err := n.Int64(); err == nil {
			return "int"
		}
		return "number"
	case float32, float64:
		return "number"
	case int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64:
		return "int"
	case []any, []string:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

// String returns the value of a string, secret, url or duration field.
func (c Config) String(name string) string {
	s, _ := c.values[name].(string)
	return s
}

// Int returns the value of an int field.
func (c Config) Int(name string) int64 {
	n, _ := c.values[name].(int64)
	return n
}

// Bool returns the value of a bool field.
func (c Config) Bool(name string) bool {
	b, _ := c.values[name].(bool)
	return b
}

// Duration returns the value of a duration field.
func (c Config) Duration(name string) time.Duration {
	d, _ := time.ParseDuration(c.String(name))
	return d
}

// URL returns the value of a url field, or nil when it is unset.
func (c Config) URL(name string) *url.URL {
	s := c.String(name)
	if s == "" {
		return nil
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil
	}
	return u
}

// Strings returns the value of a string_list field.
func (c Config) Strings(name string) []string {
	l, _ := c.values[name].([]string)
	return append([]string(nil), l...)
}

// Has reports whether the field has a value (given or defaulted).
func (c Config) Has(name string) bool {
	_, ok := c.values[name]
	return ok
}

// Values returns a copy of the values in their JSON form, secrets included.
func (c Config) Values() map[string]any {
	out := make(map[string]any, len(c.values))
	for k, v := range c.values {
		if l, ok := v.([]string); ok {
			v = append([]string(nil), l...)
		}
		out[k] = v
	}
	return out
}

// MarshalJSON encodes the values, secrets included; it is what travels to
// the plugin. Use Redacted for anything a person may read.
func (c Config) MarshalJSON() ([]byte, error) {
	b, err := json.Marshal(c.values)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return b, nil
}

// Redacted returns the values with every secret replaced by "<redacted>".
func (c Config) Redacted() map[string]any {
	out := c.Values()
	for k := range out {
		if c.secret[k] {
			out[k] = "<redacted>"
		}
	}
	return out
}

// GoString prints the configuration with secrets redacted.
func (c Config) GoString() string { return c.format() }

// Format implements fmt.Formatter so that no verb prints a secret.
func (c Config) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(c.format())) }

func (c Config) format() string {
	r := c.Redacted()
	keys := make([]string, 0, len(r))
	for k := range r {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("Config{")
	for i, k := range keys {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%s:%v", k, r[k])
	}
	b.WriteString("}")
	return b.String()
}

var (
	_ fmt.Formatter  = Config{}
	_ fmt.GoStringer = Config{}
)
