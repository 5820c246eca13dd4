package examples_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestReadmeQuickStart compiles the Go programs of the README's Quick start
// exactly as they stand, so that a newcomer who copies them gets a program
// that builds.
func TestReadmeQuickStart(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(readme)
	start := strings.Index(text, "\n## Quick start\n")
	if start < 0 {
		t.Fatal("the README has no Quick start section")
	}
	section := text[start+1:]
	if end := strings.Index(section[3:], "\n## "); end >= 0 {
		section = section[:end+3]
	}
	blocks := regexp.MustCompile("(?s)```go\n(.*?)```").FindAllStringSubmatch(section, -1)
	if len(blocks) < 2 {
		t.Fatalf("the Quick start has %d Go programs, want a server and a client", len(blocks))
	}
	for i, b := range blocks {
		if !strings.HasPrefix(b[1], "package main\n") {
			t.Errorf("Quick start block %d is not a whole program (package main)", i+1)
			continue
		}
		dir := t.TempDir()
		src := filepath.Join(dir, "main.go")
		if err := os.WriteFile(src, []byte(b[1]), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "prog"), src)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("Quick start block %d does not compile: %v\n%s", i+1, err, out)
		}
	}
}
