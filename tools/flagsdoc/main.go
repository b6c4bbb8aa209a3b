// Command flagsdoc regenerates docs/flags.md, the flags reference of every
// actiond subcommand. The FlagSets live in package main of cmd/actiond, so
// the generator is cmd/actiond's TestFlagsDoc in update mode; this command
// runs it from the module root:
//
//	go run ./tools/flagsdoc
package main

import (
	"fmt"
	"os"
	"os/exec"
)

func main() {
	cmd := exec.Command("go", "test", "-count=1", "-run", "^TestFlagsDoc$", "./cmd/actiond", "-args", "-update-flags-doc")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "flagsdoc: regenerate docs/flags.md: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("wrote docs/flags.md")
}
