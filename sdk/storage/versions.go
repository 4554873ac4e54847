package storage

// Versions of the storage driver API. A driver lists the ones it implements
// in Info.APIVersions; the host negotiates with base.NegotiateAPIVersion.
const (
	APIVersion1 = "1.0"
)

// SupportedAPIVersions lists the storage API versions this SDK speaks.
func SupportedAPIVersions() []string { return []string{APIVersion1} }

// Chunking of the Put and Get streams.
const (
	// ChunkSize is the size of the chunks the SDK sends.
	ChunkSize = 1 << 20
	// MaxChunkSize is the largest chunk the SDK accepts; a peer that sends
	// a larger one is broken and the stream fails.
	MaxChunkSize = 2 << 20
)
