package examples_test

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// pinned is how CI installs the generator and its plugins; the generated
// files name the plugin versions, so others produce a difference.
const pinned = "go install github.com/bufbuild/buf/cmd/buf@v1.75.0 google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12 google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2"

// tool finds a command on PATH or in the Go install directory.
func tool(name string) (string, bool) {
	if p, err := exec.LookPath(name); err == nil {
		return p, true
	}
	var dirs []string
	if gobin := os.Getenv("GOBIN"); gobin != "" {
		dirs = append(dirs, gobin)
	}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		for _, p := range filepath.SplitList(strings.TrimSpace(string(out))) {
			dirs = append(dirs, filepath.Join(p, "bin"))
		}
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p, true
		}
	}
	return "", false
}

// TestGeneratedCodeIsCurrent runs buf generate into a temporary directory
// and compares the result with the committed code, so that a .proto change
// without regeneration (or generation with other plugin versions) fails.
func TestGeneratedCodeIsCurrent(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "buf.gen.yaml")); err != nil {
		t.Fatalf("no buf.gen.yaml at the module root %s: %v", root, err)
	}
	var path []string
	for _, name := range []string{"buf", "protoc-gen-go", "protoc-gen-go-grpc"} {
		p, ok := tool(name)
		if !ok {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is not installed, and CI must check the generated code; install with: %s", name, pinned)
			}
			t.Skipf("%s is not installed, so the generated code is not checked; install with: %s", name, pinned)
		}
		path = append(path, filepath.Dir(p))
	}

	out := t.TempDir()
	cmd := exec.Command(filepath.Join(path[0], "buf"), "generate", "--output", out)
	cmd.Dir = root
	// buf runs the local plugins from PATH.
	cmd.Env = append(os.Environ(), "PATH="+strings.Join(append(path, os.Getenv("PATH")), string(os.PathListSeparator)))
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("buf generate: %v\n%s", err, msg)
	}

	const regen = "regenerate from the repository root with: PATH=\"$PATH:$(go env GOPATH)/bin\" buf generate"
	generated := map[string]bool{}
	err = filepath.WalkDir(out, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(out, p)
		generated[rel] = true
		want, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		got, err := os.ReadFile(filepath.Join(root, rel))
		if err != nil {
			t.Errorf("%s is generated but not committed (%v); %s", rel, err, regen)
			return nil
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: %s; %s", rel, firstDifference(got, want), regen)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(generated) == 0 {
		t.Fatal("buf generate produced no files; is buf.gen.yaml's output under proto/?")
	}
	// Generated files whose .proto is gone are stale too.
	err = filepath.WalkDir(filepath.Join(root, "proto"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".pb.go") {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if !generated[rel] {
			t.Errorf("%s is committed but no longer generated; delete it, or %s", rel, regen)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func firstDifference(got, want []byte) string {
	g, w := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			return fmt.Sprintf("line %d is %q, buf generates %q", i+1, gl, wl)
		}
	}
	return "the files differ"
}
