// Command wrongproto is a plugin that speaks the wrong protocol: its
// handshake line offers net/rpc where the core wants gRPC.
package main

import (
	"fmt"
	"time"
)

func main() {
	fmt.Println("1|1|tcp|127.0.0.1:1|netrpc")
	time.Sleep(24 * time.Hour)
}
