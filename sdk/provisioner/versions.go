package provisioner

// Versions of the provisioner driver API. A driver lists the ones it
// implements in Info.APIVersions; the host negotiates with
// base.NegotiateAPIVersion.
const (
	APIVersion1 = "1.0"
)

// SupportedAPIVersions lists the provisioner API versions this SDK speaks.
func SupportedAPIVersions() []string { return []string{APIVersion1} }
