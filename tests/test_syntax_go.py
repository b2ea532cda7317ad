from pathlib import Path

import pytest

from mlx_ltc.data import syntax

ROOT = Path(__file__).parent / "fixtures" / "polyglot" / "go"


@pytest.fixture(scope="module")
def repo():
    paths = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file())
    return paths, {p: syntax.parse(p, (ROOT / p).read_bytes()) for p in paths}


def test_edges(repo):
    paths, parsed = repo
    assert syntax.resolve_all(parsed, paths, lambda p: (ROOT / p).read_text()) == [
        ("config/config.go", "internal/util/util.go"),
        ("config/config_test.go", "config/config.go"),  # the package it tests, with its export_test.go
        ("config/config_test.go", "config/defaults.go"),
        ("config/config_test.go", "config/export_test.go"),
        ("internal/store/memory.go", "internal/util/util.go"),
        ("internal/store/store.go", "config/config.go"),
        ("internal/store/store.go", "config/defaults.go"),
        ("main.go", "config/config.go"),  # aliased
        ("main.go", "config/defaults.go"),
        ("main.go", "internal/store/memory.go"),
        ("main.go", "internal/store/store.go"),
        ("main.go", "internal/util/util.go"),  # dot import
        ("main.go", "plugins/audit/audit.go"),  # blank import
        ("main.go", "vendor/github.com/pkg/errors/errors.go"),  # vendored; github.com/google/uuid is not here
        ("tools/gen/main.go", "config/config.go"),
        ("tools/gen/main.go", "config/defaults.go"),
        ("tools/gen/main.go", "tools/lib/lib.go"),  # nested module: the longest module path wins
    ]


def test_import_specs(repo):
    _, parsed = repo
    assert parsed["main.go"].imports == [
        "fmt",
        "example.com/shop/config",
        "example.com/shop/internal/store",
        "example.com/shop/internal/util",
        "example.com/shop/plugins/audit",
        "github.com/google/uuid",
        "github.com/pkg/errors",
    ]
    assert parsed["config/config_test.go"].imports == ["testing", "example.com/shop/config"]


def test_definitions(repo):
    _, parsed = repo
    source = (ROOT / "internal/store/store.go").read_bytes()
    found = [
        (d.name, d.kind, d.depth, d.returns, source[d.start : d.end].decode())
        for d in parsed["internal/store/store.go"].definitions
    ]
    assert [x[:4] for x in found] == [
        ("Kind", "type", 0, None),
        ("KindA", "const", 0, None),
        ("defaultName", "var", 0, None),
        ("Item", "struct", 0, None),
        ("Lister", "interface", 0, None),
        ("Alias", "type", 0, None),
        ("Store", "struct", 0, None),
        ("New", "function", 0, "&Store[string]{items: map[string]Item{}}"),
        ("Store.Get", "method", 0, None),  # two values
        ("Store.Len", "method", 0, "len(s.items)"),  # the func literal's return is its own
        ("normalize", "function", 0, None),  # two returns
        ("nothing", "function", 0, None),
    ]
    text = {name: body for name, _, _, _, body in found}
    assert text["Kind"] == "// Kind of an item.\ntype Kind int"
    assert text["KindA"] == "// Kinds of items.\nconst (\n\tKindA Kind = iota\n\tKindB\n)"
    assert text["Item"] == "// Item is one thing for sale.\n\tItem struct {\n\t\tName string\n\t}"
    assert text["Alias"] == "Alias = Item"
    assert text["Store"].startswith("// Store holds items.\n// It is safe for one goroutine.\ntype Store[K comparable]")
    assert text["Store.Len"].startswith("func (s Store[K]) Len() int {")  # a blank line detaches the comment
    assert text["nothing"] == "func nothing() {}"
    assert parsed["internal/store/store.go"].errors is False


def test_module_path_from_quoted_go_mod():
    sources = {
        "go.mod": 'module "example.org/a" // comment\n',
        "x/x.go": 'package x\nimport "example.org/a/y"\n',
        "y/y.go": "package y\n",
        "y/y_test.go": 'package y\nimport "example.org/a/y"\n',
        "y/other_test.go": "package y\n",
    }
    parsed = {p: syntax.parse(p, s.encode()) for p, s in sources.items()}
    assert syntax.resolve_all(parsed, list(sources), sources.__getitem__) == [
        ("x/x.go", "y/y.go"),
        ("y/y_test.go", "y/other_test.go"),
        ("y/y_test.go", "y/y.go"),
    ]
