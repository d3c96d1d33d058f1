package hygiene

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// moduleRoot is two levels up from this package.
func moduleRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("no go.mod at %s", root)
	}
	return root
}

// goDirs lists folders with non-test Go files, skipping node_modules, testdata and dot folders.
func goDirs(t *testing.T, root string) []string {
	var dirs []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			if path != root && (strings.HasPrefix(name, ".") || name == "node_modules" || name == "testdata" || name == "bin") {
				return filepath.SkipDir
			}
			matches, _ := filepath.Glob(filepath.Join(path, "*.go"))
			for _, m := range matches {
				if !strings.HasSuffix(m, "_test.go") {
					dirs = append(dirs, path)
					break
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return dirs
}

// parsePackages parses the non-test Go files of dir, grouped by package name and keyed by
// file name (go/parser.ParseDir, deprecated, did the same).
func parsePackages(t *testing.T, dir string, mode parser.Mode) map[string]map[string]*ast.File {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	pkgs := map[string]map[string]*ast.File{}
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, mode)
		if err != nil {
			t.Fatal(err)
		}
		if pkgs[f.Name.Name] == nil {
			pkgs[f.Name.Name] = map[string]*ast.File{}
		}
		pkgs[f.Name.Name][name] = f
	}
	return pkgs
}

func TestEveryPackageHasADocComment(t *testing.T) {
	root := moduleRoot(t)
	dirs := goDirs(t, root)
	if len(dirs) < 10 {
		t.Fatalf("found only %d packages under %s", len(dirs), root)
	}
	for _, dir := range dirs {
		pkgs := parsePackages(t, dir, parser.ParseComments|parser.PackageClauseOnly)
		for name, files := range pkgs {
			documented := false
			for _, f := range files {
				if f.Doc != nil && strings.TrimSpace(f.Doc.Text()) != "" {
					documented = true
				}
			}
			if !documented {
				rel, _ := filepath.Rel(root, dir)
				t.Errorf("package %s (%s) has no package doc comment", name, rel)
			}
		}
	}
}

// Library packages must not have init functions: they hide package-level state and side
// effects (flag registration, globals) that break running many devices in one process.
func TestNoInitInLibraries(t *testing.T) {
	root := moduleRoot(t)
	for _, dir := range goDirs(t, root) {
		rel, _ := filepath.Rel(root, dir)
		if !strings.HasPrefix(rel, "pkg"+string(filepath.Separator)) && !strings.HasPrefix(rel, "internal"+string(filepath.Separator)) {
			continue
		}
		for _, files := range parsePackages(t, dir, 0) {
			for fname, f := range files {
				for _, d := range f.Decls {
					if fn, ok := d.(*ast.FuncDecl); ok && fn.Recv == nil && fn.Name.Name == "init" {
						t.Errorf("%s: func init in a library package", filepath.Join(rel, filepath.Base(fname)))
					}
				}
			}
		}
	}
}
