package sdktest_test

import (
	"io"
	"os"
	"testing"

	"github.com/hashicorp/go-hclog"
)

// TestMain quiets go-plugin's test connection, which logs at debug level to
// hclog's default output (stderr) with no option to turn it off; its lines
// would land in the middle of benchmark results. The kit's own plugin logs
// go to the test log and are not affected.
func TestMain(m *testing.M) {
	hclog.DefaultOutput = io.Discard
	os.Exit(m.Run())
}
