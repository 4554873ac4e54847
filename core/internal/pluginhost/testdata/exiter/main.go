// Command exiter is a plugin that exits at start, before the handshake.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "exiter: cannot reach my backend, giving up")
	os.Exit(3)
}
