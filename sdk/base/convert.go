package base

import (
	"encoding/json"
	"fmt"

	basepb "github.com/gpuaas/gpuaas/sdk/base/proto"
)

// This file is the only place base types meet their protobuf form.

func infoToProto(i *Info) *basepb.InfoResponse {
	return &basepb.InfoResponse{
		Name:          i.Name,
		Kind:          string(i.Kind),
		DriverVersion: i.DriverVersion,
		ApiVersions:   append([]string(nil), i.APIVersions...),
		Capabilities:  append([]string(nil), i.Capabilities...),
	}
}

func infoFromProto(p *basepb.InfoResponse) *Info {
	return &Info{
		Name:          p.GetName(),
		Kind:          Kind(p.GetKind()),
		DriverVersion: p.GetDriverVersion(),
		APIVersions:   append([]string(nil), p.GetApiVersions()...),
		Capabilities:  append([]string(nil), p.GetCapabilities()...),
	}
}

func fieldTypeToProto(t FieldType) basepb.FieldType {
	switch t {
	case TypeString:
		return basepb.FieldType_FIELD_TYPE_STRING
	case TypeInt:
		return basepb.FieldType_FIELD_TYPE_INT
	case TypeBool:
		return basepb.FieldType_FIELD_TYPE_BOOL
	case TypeDuration:
		return basepb.FieldType_FIELD_TYPE_DURATION
	case TypeURL:
		return basepb.FieldType_FIELD_TYPE_URL
	case TypeSecret:
		return basepb.FieldType_FIELD_TYPE_SECRET
	case TypeStringList:
		return basepb.FieldType_FIELD_TYPE_STRING_LIST
	}
	return basepb.FieldType_FIELD_TYPE_UNSPECIFIED
}

func fieldTypeFromProto(t basepb.FieldType) FieldType {
	switch t {
	case basepb.FieldType_FIELD_TYPE_STRING:
		return TypeString
	case basepb.FieldType_FIELD_TYPE_INT:
		return TypeInt
	case basepb.FieldType_FIELD_TYPE_BOOL:
		return TypeBool
	case basepb.FieldType_FIELD_TYPE_DURATION:
		return TypeDuration
	case basepb.FieldType_FIELD_TYPE_URL:
		return TypeURL
	case basepb.FieldType_FIELD_TYPE_SECRET:
		return TypeSecret
	case basepb.FieldType_FIELD_TYPE_STRING_LIST:
		return TypeStringList
	}
	return FieldType(fmt.Sprintf("unknown(%d)", int32(t)))
}

func schemaToProto(s *ConfigSchema) (*basepb.ConfigSchemaResponse, error) {
	out := &basepb.ConfigSchemaResponse{Fields: make([]*basepb.ConfigField, 0, len(s.Fields))}
	for i := range s.Fields {
		f := &s.Fields[i]
		pf := &basepb.ConfigField{
			Name:        f.Name,
			Type:        fieldTypeToProto(f.Type),
			Required:    f.Required,
			Description: f.Description,
			Sensitive:   f.Sensitive,
		}
		if f.Default != nil {
			def, err := normalize(f, f.Default)
			if err != nil {
				return nil, fmt.Errorf("config schema: default: %w", err)
			}
			b, err := json.Marshal(def)
			if err != nil {
				return nil, fmt.Errorf("config schema: field %q: default: %w", f.Name, err)
			}
			pf.DefaultJson = b
		}
		out.Fields = append(out.Fields, pf)
	}
	return out, nil
}

func schemaFromProto(p *basepb.ConfigSchemaResponse) (*ConfigSchema, error) {
	out := &ConfigSchema{Fields: make([]Field, 0, len(p.GetFields()))}
	for _, pf := range p.GetFields() {
		f := Field{
			Name:        pf.GetName(),
			Type:        fieldTypeFromProto(pf.GetType()),
			Required:    pf.GetRequired(),
			Description: pf.GetDescription(),
			Sensitive:   pf.GetSensitive(),
		}
		if len(pf.GetDefaultJson()) > 0 {
			var def any
			if err := json.Unmarshal(pf.GetDefaultJson(), &def); err != nil {
				return nil, fmt.Errorf("config schema: field %q: default: %v: %w", f.Name, err, ErrInternal)
			}
			f.Default = def
		}
		out.Fields = append(out.Fields, f)
	}
	return out, nil
}
