// Command hanger is a plugin that hangs at start: it never writes the
// go-plugin handshake line.
package main

import (
	"fmt"
	"os"
	"time"
)

func main() {
	fmt.Fprintln(os.Stderr, "hanger: waiting for something that never comes")
	time.Sleep(24 * time.Hour)
}
