package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/actiond/actiond/vmhost/vmpayload"
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	m, err := vmpayload.Build(context.Background(), vmpayload.Options{Arch: os.Args[1], Dir: os.Args[2], Src: "/work/wt/payload", Logger: log, Runtimes: os.Args[3:]})
	if err != nil {
		fmt.Println("FAILED:", err)
		os.Exit(1)
	}
	fmt.Println(m.ContentHash)
}
