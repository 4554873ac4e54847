package nomadsim

import (
	"fmt"
	"slices"
	"strings"

	nomad "github.com/hashicorp/nomad/api"
)

// multiError formats errors as go-multierror does; Nomad answers job
// validation failures with this text and status 500.
func multiError(errs []string) string {
	points := make([]string, len(errs))
	for i, e := range errs {
		points[i] = "* " + e
	}
	noun := "errors"
	if len(errs) == 1 {
		noun = "error"
	}
	return fmt.Sprintf("%d %s occurred:\n\t%s\n\n", len(errs), noun, strings.Join(points, "\n\t"))
}

// validate checks a canonicalized job the way Nomad's job validation and
// admission hooks do, for the parts a job of the manual driver uses, with
// Nomad's messages.
func validate(job *nomad.Job, namespaces []string) []string {
	var errs []string
	id := *job.ID
	switch {
	case id == "":
		errs = append(errs, "Missing job ID")
	case strings.Contains(id, " "):
		errs = append(errs, "Job ID contains a space")
	case strings.Contains(id, "\x00"):
		errs = append(errs, "Job ID contains a null character")
	}
	if *job.Name == "" {
		errs = append(errs, "Missing job name")
	}
	switch *job.Type {
	case nomad.JobTypeService, nomad.JobTypeBatch, nomad.JobTypeSystem, nomad.JobTypeSysbatch:
	case "":
		errs = append(errs, "Missing job type")
	default:
		errs = append(errs, fmt.Sprintf("Invalid job type: %q", *job.Type))
	}
	if p := *job.Priority; p < 1 || p > 100 {
		errs = append(errs, fmt.Sprintf("Job priority must be between [%d, %d]", 1, 100))
	}
	for _, dc := range job.Datacenters {
		if dc == "" {
			errs = append(errs, "datacenter must be non-empty string")
		}
	}
	for i, c := range job.Constraints {
		if err := checkConstraint(c); err != "" {
			errs = append(errs, fmt.Sprintf("Constraint %d validation failed: %s", i+1, err))
		}
	}
	if job.Update != nil && job.Update.HealthCheck != nil {
		switch hc := *job.Update.HealthCheck; hc {
		case "checks", "task_states", "manual":
		default:
			errs = append(errs, fmt.Sprintf("Invalid health check given: %q", hc))
		}
	}
	if len(job.TaskGroups) == 0 {
		errs = append(errs, "Missing job task groups")
	}
	seen := map[string]bool{}
	for i, tg := range job.TaskGroups {
		name := ""
		if tg.Name != nil {
			name = *tg.Name
		}
		if name == "" {
			errs = append(errs, fmt.Sprintf("Job task group %d missing name", i+1))
			continue
		}
		if seen[name] {
			errs = append(errs, fmt.Sprintf("Job task group %d redefines '%s' from group %d", i+1, name, i))
		}
		seen[name] = true
		if gerrs := validateGroup(tg); len(gerrs) > 0 {
			errs = append(errs, fmt.Sprintf("Task group %s validation failed: %s", name, multiError(gerrs)))
		}
	}
	if !slices.Contains(namespaces, *job.Namespace) {
		errs = append(errs, fmt.Sprintf("job %q is in nonexistent namespace %q", id, *job.Namespace))
	}
	return errs
}

func checkConstraint(c *nomad.Constraint) string {
	switch c.Operand {
	case "=", "==", "is", "!=", "not", "<", "<=", ">", ">=", "regexp", "version", "semver", "set_contains",
		"set_contains_all", "set_contains_any", "distinct_hosts", "distinct_property", "is_set", "is_not_set":
	default:
		return fmt.Sprintf("Unknown constraint type %q", c.Operand)
	}
	if c.LTarget == "" && c.Operand != "distinct_hosts" {
		return "No LTarget provided but is required by constraint"
	}
	return ""
}

func validateGroup(tg *nomad.TaskGroup) []string {
	var errs []string
	if tg.Count != nil && *tg.Count < 0 {
		errs = append(errs, "Task group count can't be negative")
	}
	if len(tg.Tasks) == 0 {
		errs = append(errs, "Missing tasks for task group")
	}
	if rp := tg.RestartPolicy; rp != nil && rp.Mode != nil {
		switch *rp.Mode {
		case "delay", "fail":
		default:
			errs = append(errs, fmt.Sprintf("Unsupported restart mode: %q", *rp.Mode))
		}
		if rp.Attempts != nil && *rp.Attempts < 0 {
			errs = append(errs, fmt.Sprintf("Invalid restart policy: attempts must be non-negative, got %d", *rp.Attempts))
		}
	}
	for i, t := range tg.Tasks {
		if t.Name == "" {
			errs = append(errs, fmt.Sprintf("Task %d missing name", i+1))
			continue
		}
		if t.Driver == "" {
			errs = append(errs, fmt.Sprintf("Task %s validation failed: %s", t.Name, multiError([]string{"Missing task driver"})))
		}
	}
	return errs
}
