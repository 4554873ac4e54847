package httpapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// maxJSONDepth bounds nesting so a hostile body cannot exhaust the stack.
const maxJSONDepth = 64

// DecodeStrict decodes body into v and rejects, each with its own stable code:
// an empty body, malformed JSON or trailing data (invalid_json), a key repeated in
// one object (duplicate_key), a field v does not have (unknown_field) and a value of
// the wrong type (validation_failed). details.field names the offending path.
func DecodeStrict(body []byte, v any) error {
	if len(bytes.TrimSpace(body)) == 0 {
		return errcode.New(errcode.InvalidJSON, "request body is empty; send a JSON object")
	}
	if err := checkDuplicates(body); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return decodeError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errcode.New(errcode.InvalidJSON, "request body has data after the JSON value")
	}
	return nil
}

func decodeError(err error) error {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return errcode.New(errcode.InvalidJSON, "malformed JSON at byte %d", syn.Offset)
	case errors.As(err, &typ):
		field := typ.Field
		return errcode.New(errcode.ValidationFailed, "field %q must be %s", field, typeName(typ.Type.Kind().String())).WithDetails("field", field)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errcode.New(errcode.InvalidJSON, "malformed JSON: unexpected end of body")
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		field := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		return errcode.New(errcode.UnknownField, "unknown field %q", field).WithDetails("field", field)
	}
	return errcode.Wrap(err, errcode.InvalidJSON, "request body is not valid JSON for this operation")
}

func typeName(kind string) string {
	switch kind {
	case "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64":
		return "an integer"
	case "float32", "float64":
		return "a number"
	case "string":
		return "a string"
	case "bool":
		return "true or false"
	case "slice", "array":
		return "an array"
	case "map", "struct":
		return "an object"
	}
	return "of another type"
}

// checkDuplicates walks the token stream and fails on the first object key that
// appears twice in the same object.
func checkDuplicates(body []byte) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := walk(dec, "", 0); err != nil {
		return err
	}
	return nil
}

func walk(dec *json.Decoder, path string, depth int) error {
	if depth > maxJSONDepth {
		return errcode.New(errcode.InvalidJSON, "JSON nested deeper than %d levels", maxJSONDepth)
	}
	tok, err := dec.Token()
	if err != nil {
		return decodeError(err)
	}
	delim, ok := tok.(json.Delim)
	if !ok {
		return nil
	}
	switch delim {
	case '{':
		seen := map[string]bool{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return decodeError(err)
			}
			key, _ := kt.(string)
			field := joinPath(path, key)
			if seen[key] {
				return errcode.New(errcode.DuplicateKey, "key %q appears more than once", field).WithDetails("field", field)
			}
			seen[key] = true
			if err := walk(dec, field, depth+1); err != nil {
				return err
			}
		}
	case '[':
		for i := 0; dec.More(); i++ {
			if err := walk(dec, fmt.Sprintf("%s[%d]", path, i), depth+1); err != nil {
				return err
			}
		}
	}
	if _, err := dec.Token(); err != nil { // the closing delimiter
		return decodeError(err)
	}
	return nil
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}
