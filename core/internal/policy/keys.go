package policy

import "time"

// The platform's keys. Domains add theirs here so Catalog lists every key.
var (
	OutboxMaxAttempts = Int("outbox.max_attempts", 10, 1, 1000,
		"Message-specific publish failures an outbox row may have before it is marked failed.")
	OutboxRetention = Duration("outbox.retention", 24*time.Hour, time.Minute, 90*24*time.Hour,
		"How long published outbox rows and consumer inbox entries are kept.")
)

// Catalog returns every key, sorted by name.
func Catalog() []*Def {
	return []*Def{
		OutboxMaxAttempts.Def(),
		OutboxRetention.Def(),
	}
}
