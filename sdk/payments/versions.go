package payments

// Versions of the payments driver API. A driver lists the ones it
// implements in Info.APIVersions; the host negotiates with
// base.NegotiateAPIVersion.
const (
	APIVersion1 = "1.0"
)

// SupportedAPIVersions lists the payments API versions this SDK speaks.
func SupportedAPIVersions() []string { return []string{APIVersion1} }
