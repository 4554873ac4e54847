// Package policy holds the platform's typed, tunable settings. Each key has a type, a
// default in code and the scopes where an operator may override it (global, org,
// project; the most specific override wins). Resolved values are cached per instance
// and every instance drops its cached value when any instance changes an override:
// the change goes through the outbox to system.policy.changed.
package policy

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"time"
)

// Type is the value type of a key.
type Type string

// The value types. Money is an amount in integer minor units.
const (
	TypeInt      Type = "int"
	TypeBool     Type = "bool"
	TypeString   Type = "string"
	TypeDuration Type = "duration"
	TypeMoney    Type = "money"
)

// Scope is where an override applies.
type Scope string

// The scopes, least to most specific.
const (
	ScopeGlobal  Scope = "global"
	ScopeOrg     Scope = "org"
	ScopeProject Scope = "project"
)

// Def describes one key. It is immutable after construction.
type Def struct {
	Key         string
	Type        Type
	Default     any // the Go value: int64, bool, string, time.Duration
	Scopes      []Scope
	Description string
	decode      func(json.RawMessage) (any, error)
}

// Allows reports whether the key may be overridden at scope.
func (d *Def) Allows(s Scope) bool { return slices.Contains(d.Scopes, s) }

// Decode parses and validates a JSON value for this key, returning the Go value.
func (d *Def) Decode(raw json.RawMessage) (any, error) {
	v, err := d.decode(raw)
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", d.Key, err)
	}
	return v, nil
}

// DefaultJSON is the default as it appears in the API (durations as strings).
func (d *Def) DefaultJSON() any {
	if d.Type == TypeDuration {
		return d.Default.(time.Duration).String()
	}
	return d.Default
}

// Key is a typed handle on a Def.
type Key[T any] struct{ def *Def }

// Def returns the key's definition.
func (k Key[T]) Def() *Def { return k.def }

func scopesOrGlobal(scopes []Scope) []Scope {
	if len(scopes) == 0 {
		return []Scope{ScopeGlobal}
	}
	return scopes
}

// Int defines an integer key with inclusive bounds.
func Int(key string, def, lo, hi int64, desc string, scopes ...Scope) Key[int64] {
	if def < lo || def > hi {
		panic(fmt.Sprintf("policy %s: default %d outside [%d, %d]", key, def, lo, hi))
	}
	return Key[int64]{&Def{Key: key, Type: TypeInt, Default: def, Scopes: scopesOrGlobal(scopes), Description: desc,
		decode: func(raw json.RawMessage) (any, error) { return decodeInt(raw, lo, hi) }}}
}

// Money defines an amount in integer minor units with inclusive bounds.
func Money(key string, def, lo, hi int64, desc string, scopes ...Scope) Key[int64] {
	k := Int(key, def, lo, hi, desc, scopes...)
	k.def.Type = TypeMoney
	return k
}

// Bool defines a boolean key.
func Bool(key string, def bool, desc string, scopes ...Scope) Key[bool] {
	return Key[bool]{&Def{Key: key, Type: TypeBool, Default: def, Scopes: scopesOrGlobal(scopes), Description: desc,
		decode: func(raw json.RawMessage) (any, error) {
			var b bool
			if err := json.Unmarshal(raw, &b); err != nil {
				return nil, fmt.Errorf("want true or false")
			}
			return b, nil
		}}}
}

// String defines a string key; allowed, when not empty, lists the accepted values.
func String(key, def string, allowed []string, desc string, scopes ...Scope) Key[string] {
	return Key[string]{&Def{Key: key, Type: TypeString, Default: def, Scopes: scopesOrGlobal(scopes), Description: desc,
		decode: func(raw json.RawMessage) (any, error) {
			var s string
			if err := json.Unmarshal(raw, &s); err != nil {
				return nil, fmt.Errorf("want a string")
			}
			if len(allowed) > 0 && !slices.Contains(allowed, s) {
				return nil, fmt.Errorf("want one of %v", allowed)
			}
			return s, nil
		}}}
}

// Duration defines a duration key (JSON "90s", "15m") with inclusive bounds.
func Duration(key string, def, lo, hi time.Duration, desc string, scopes ...Scope) Key[time.Duration] {
	if def < lo || def > hi {
		panic(fmt.Sprintf("policy %s: default %s outside [%s, %s]", key, def, lo, hi))
	}
	return Key[time.Duration]{&Def{Key: key, Type: TypeDuration, Default: def, Scopes: scopesOrGlobal(scopes), Description: desc,
		decode: func(raw json.RawMessage) (any, error) {
			var s string
			if err := json.Unmarshal(raw, &s); err != nil {
				return nil, fmt.Errorf("want a duration string such as \"90s\"")
			}
			d, err := time.ParseDuration(s)
			if err != nil {
				return nil, fmt.Errorf("want a duration string such as \"90s\": %w", err)
			}
			if d < lo || d > hi {
				return nil, fmt.Errorf("want a duration between %s and %s", lo, hi)
			}
			return d, nil
		}}}
}

func decodeInt(raw json.RawMessage, lo, hi int64) (any, error) {
	var f json.Number
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("want an integer")
	}
	n, err := f.Int64()
	if err != nil {
		if x, ferr := f.Float64(); ferr == nil && x == math.Trunc(x) && math.Abs(x) < 1<<53 {
			n = int64(x)
		} else {
			return nil, fmt.Errorf("want an integer")
		}
	}
	if n < lo || n > hi {
		return nil, fmt.Errorf("want an integer between %d and %d", lo, hi)
	}
	return n, nil
}
