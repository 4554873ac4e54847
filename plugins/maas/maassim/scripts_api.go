package maassim

import (
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
)

func (s *Server) sortedScriptsLocked() []*script {
	out := make([]*script, 0, len(s.scripts))
	for _, sc := range s.scripts {
		out = append(out, sc)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// scriptJSON renders a script as MAAS's NodeScriptHandler does; the
// history is newest first and carries the content when includeScript.
func scriptJSON(sc *script, includeScript bool) map[string]any {
	history := []map[string]any{}
	for i := len(sc.versions) - 1; i >= 0; i-- {
		v := sc.versions[i]
		h := map[string]any{"id": v.id, "comment": v.comment, "created": fmtTime(v.created)}
		if includeScript {
			h["data"] = encodeBase64(v.data)
		}
		history = append(history, h)
	}
	tags := append([]string{}, sc.tags...)
	return map[string]any{
		"id": sc.id, "name": sc.name, "title": sc.title, "description": sc.description, "tags": tags,
		"type": sc.scriptType, "type_name": scriptTypeName(sc.scriptType),
		"hardware_type": sc.hardwareType, "hardware_type_name": hardwareTypeName(sc.hardwareType),
		"parallel": sc.parallel, "parallel_name": parallelName(sc.parallel),
		"results": map[string]any{}, "parameters": map[string]any{}, "packages": map[string]any{},
		"timeout": formatTimeout(sc.timeout), "destructive": sc.destructive, "for_hardware": append([]string{}, sc.forHardware...),
		"may_reboot": sc.mayReboot, "recommission": sc.recommission, "history": history, "default": false,
		"apply_configured_networking": sc.applyNetconf,
		"resource_uri":                "/MAAS/api/2.0/scripts/" + sc.name,
	}
}

// scriptUpload reads the form values and the uploaded script of a create
// or update request: the file part named "script", or the only file part
// (whose name then names the script).
func scriptUpload(r *http.Request) (map[string]string, []byte, error) {
	form := map[string]string{}
	for k, vs := range r.PostForm {
		if len(vs) > 0 {
			form[k] = vs[len(vs)-1]
		}
	}
	if r.MultipartForm == nil {
		return form, nil, nil
	}
	files := r.MultipartForm.File
	pick := ""
	if _, ok := files["script"]; ok {
		pick = "script"
	} else if len(files) == 1 {
		for name := range files {
			pick = name
			form["name"] = name
		}
	}
	if pick == "" || len(files[pick]) == 0 {
		return form, nil, nil
	}
	f, err := files[pick][0].Open()
	if err != nil {
		return nil, nil, fmt.Errorf("maassim: script upload: %w", err)
	}
	defer func() { _ = f.Close() }()
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, nil, fmt.Errorf("maassim: script upload: %w", err)
	}
	return form, data, nil
}

func (s *Server) scriptsCollection(req *apiRequest) {
	switch {
	case req.r.Method == http.MethodGet && req.op == "":
		f := req.r.Form
		wantType := -1
		if v := f.Get("type"); v != "" {
			t, ok := translateScriptType(v)
			if !ok {
				writeText(req.w, http.StatusBadRequest, "Script type must be commissioning, testing or release")
				return
			}
			wantType = t
		}
		var filters []string
		if v := f.Get("filters"); v != "" {
			filters = strings.Split(v, ",")
		}
		include := f.Has("include_script") && parseBool(f.Get("include_script"))
		out := []map[string]any{}
		for _, sc := range s.sortedScriptsLocked() {
			if wantType != -1 && sc.scriptType != wantType {
				continue
			}
			if len(filters) > 0 && !contains(filters, sc.name) && !anyContains(filters, sc.tags) {
				continue
			}
			out = append(out, scriptJSON(sc, include))
		}
		writeJSON(req.w, http.StatusOK, out)
	case req.r.Method == http.MethodPost && req.op == "":
		form, data, err := scriptUpload(req.r)
		if err != nil {
			writeText(req.w, http.StatusBadRequest, err.Error())
			return
		}
		errs := formErrors{}
		sc := &script{}
		applyScriptForm(sc, form, data, true, errs)
		if _, dup := s.scripts[sc.name]; dup && sc.name != "" {
			errs.add("name", "Script with this Name already exists.")
		}
		if len(errs) > 0 {
			writeFormErrors(req.w, errs)
			return
		}
		s.nextScriptID++
		sc.id = 1000 + s.nextScriptID
		s.nextVerID++
		sc.versions = []*scriptVersion{{id: 2000 + s.nextVerID, data: data, comment: form["comment"], created: req.now}}
		s.scripts[sc.name] = sc
		writeJSON(req.w, http.StatusOK, scriptJSON(sc, false))
	default:
		req.badOp()
	}
}

func anyContains(filters, tags []string) bool {
	for _, t := range tags {
		if contains(filters, t) {
			return true
		}
	}
	return false
}

func (s *Server) scriptOr404(req *apiRequest, name string) *script {
	sc, ok := s.scripts[name]
	if !ok {
		if id, err := strconv.Atoi(name); err == nil {
			for _, c := range s.scripts {
				if c.id == id {
					return c
				}
			}
		}
		writeText(req.w, http.StatusNotFound, "No Script matches the given query.")
		return nil
	}
	return sc
}

func (s *Server) scriptResource(req *apiRequest, name string) {
	sc := s.scriptOr404(req, name)
	if sc == nil {
		return
	}
	switch {
	case req.r.Method == http.MethodGet && req.op == "":
		include := req.r.Form.Has("include_script") && req.r.Form.Get("include_script") != ""
		writeJSON(req.w, http.StatusOK, scriptJSON(sc, include))
	case req.r.Method == http.MethodGet && req.op == "download":
		data := sc.current().data
		if v := req.r.Form.Get("revision"); v != "" {
			rev, _ := strconv.Atoi(v)
			data = nil
			for _, ver := range sc.versions {
				if ver.id == rev {
					data = ver.data
				}
			}
			if data == nil {
				writeText(req.w, http.StatusBadRequest, fmt.Sprintf("%s not found in history", v))
				return
			}
		}
		req.w.Header().Set("Content-Type", "application/binary")
		req.w.WriteHeader(http.StatusOK)
		_, _ = req.w.Write(data)
	case req.r.Method == http.MethodPut && req.op == "":
		form, data, err := scriptUpload(req.r)
		if err != nil {
			writeText(req.w, http.StatusBadRequest, err.Error())
			return
		}
		errs := formErrors{}
		updated := *sc
		delete(form, "name")
		applyScriptForm(&updated, form, data, false, errs)
		if len(errs) > 0 {
			writeFormErrors(req.w, errs)
			return
		}
		if data != nil {
			s.nextVerID++
			updated.versions = append(append([]*scriptVersion(nil), sc.versions...),
				&scriptVersion{id: 2000 + s.nextVerID, data: data, comment: form["comment"], created: req.now})
		}
		*sc = updated
		writeJSON(req.w, http.StatusOK, scriptJSON(sc, false))
	case req.r.Method == http.MethodDelete:
		delete(s.scripts, sc.name)
		req.w.WriteHeader(http.StatusNoContent)
	default:
		req.badOp()
	}
}
