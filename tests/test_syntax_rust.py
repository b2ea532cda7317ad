from pathlib import Path

import pytest

from mlx_ltc.data import syntax
from mlx_ltc.data.syntax import rust

ROOT = Path(__file__).parent / "fixtures" / "polyglot" / "rust"


def project(root):
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return paths, lambda path: (root / path).read_text()


@pytest.fixture(scope="module")
def parsed():
    paths, read = project(ROOT)
    return {p: syntax.parse(p, (ROOT / p).read_bytes()) for p in paths}


def edges(files, sources):
    """resolve_all over an in-memory repo {path: text}."""
    read = sources.__getitem__
    return syntax.resolve_all({p: syntax.parse(p, sources[p].encode()) for p in files}, list(sources), read)


def test_workspace_edges(parsed):
    paths, read = project(ROOT)
    assert syntax.resolve_all(parsed, paths, read) == [
        ("app/src/bin/tool/helpers.rs", "core-lib/src/util.rs"),  # another workspace crate by name
        ("app/src/bin/tool/main.rs", "app/src/bin/tool/helpers.rs"),  # a binary's root owns its directory
        ("app/src/cli.rs", "app/src/commands/run.rs"),  # `run::{self, Runner}`
        ("app/src/cli.rs", "core-lib/src/shapes/square.rs"),  # crate renamed in Cargo.toml (`package = ...`)
        ("app/src/commands/mod.rs", "app/src/cli.rs"),  # super::super inside an inline block
        ("app/src/commands/mod.rs", "app/src/commands/run.rs"),
        ("app/src/commands/run.rs", "app/src/cli.rs"),
        ("app/src/main.rs", "app/src/cli.rs"),
        ("app/src/main.rs", "app/src/commands/mod.rs"),
        ("app/src/main.rs", "core-lib/src/lib.rs"),  # extern crate; `core_lib::{area, ..}`
        ("app/src/main.rs", "core-lib/src/shapes/circle.rs"),
        ("app/src/main.rs", "core-lib/src/util/helpers.rs"),  # aliased `util::helpers as h`
        ("app/src/sys.rs", "app/src/cli.rs"),  # declared inside cfg_if!: placed by its file path
        ("core-lib/src/inline/nested.rs", "core-lib/src/lib.rs"),  # super is the inline block in lib.rs
        ("core-lib/src/inline/nested.rs", "core-lib/src/shapes/square.rs"),
        ("core-lib/src/lib.rs", "core-lib/src/inline/nested.rs"),  # `mod inline { pub mod nested; }`
        ("core-lib/src/lib.rs", "core-lib/src/platform/linux_impl.rs"),  # #[path]
        ("core-lib/src/lib.rs", "core-lib/src/shapes/circle.rs"),  # pub use re-export
        ("core-lib/src/lib.rs", "core-lib/src/shapes/mod.rs"),
        ("core-lib/src/lib.rs", "core-lib/src/util.rs"),
        ("core-lib/src/lib.rs", "core-lib/src/util/helpers.rs"),
        ("core-lib/src/platform/linux_impl.rs", "core-lib/src/platform/detail.rs"),  # #[path] file owns its dir
        ("core-lib/src/shapes/circle.rs", "core-lib/src/shapes/square.rs"),
        ("core-lib/src/shapes/circle.rs", "core-lib/src/util.rs"),
        ("core-lib/src/shapes/mod.rs", "core-lib/src/shapes/circle.rs"),
        ("core-lib/src/shapes/mod.rs", "core-lib/src/shapes/square.rs"),
        ("core-lib/src/shapes/mod.rs", "core-lib/src/util/helpers.rs"),  # glob
        ("core-lib/src/shapes/square.rs", "core-lib/src/platform/linux_impl.rs"),
        ("core-lib/src/util.rs", "core-lib/src/util/helpers.rs"),  # a.rs + a/b.rs layout
        ("core-lib/src/util/helpers.rs", "core-lib/src/shapes/circle.rs"),
        ("core-lib/src/util/helpers.rs", "core-lib/src/shapes/square.rs"),
        ("core-lib/tests/common/mod.rs", "core-lib/src/lib.rs"),
        ("core-lib/tests/integration.rs", "core-lib/src/shapes/mod.rs"),  # shapes::Circle is an item of shapes
        ("core-lib/tests/integration.rs", "core-lib/tests/common/mod.rs"),
    ]


def test_import_specs(parsed):
    assert parsed["core-lib/src/lib.rs"].imports == [
        "mod shapes",
        "mod util",
        "mod platform = platform/linux_impl.rs",
        "mod inline::nested",
        "use shapes::circle::Circle",
        "use crate::util::helpers::clamp",
        "use crate::util",
    ]
    assert parsed["app/src/main.rs"].imports == [
        "mod cli",
        "mod commands",
        "use ::core_lib",
        "use core_lib::shapes::circle::Circle",
        "use core_lib::area",
        "use core_lib::util::helpers",
        "use std::collections::HashMap",
        "use serde::Serialize",
        "use crate::cli::parse",
    ]
    assert parsed["app/src/commands/mod.rs"].imports == ["mod run", "use self::run::Runner", "use super::cli"]
    assert parsed["core-lib/src/util/helpers.rs"].imports == [
        "use self",
        "use crate::shapes::circle::Circle",
        "use crate::shapes::square",
    ]


def test_bare_paths_in_inline_blocks():
    source = b"mod a { use b::X; use ::c::Y; mod d { use super::super::e; use self::f::g; mod k; } }\nfn f() { mod z; }"
    root = syntax._parser("rust", "rust").parse(source).root_node
    assert rust.imports(root, source, "rust") == [
        "use b::X in a",
        "use ::c::Y",
        "use self::e",
        "use self::a::d::f::g",
        "mod a::d::k",  # `mod z;` in a function body is no module of the file
    ]


def test_without_cargo_toml():
    sources = {
        "src/lib.rs": "mod net;\npub use net::tcp::Stream;\n",
        "src/net/mod.rs": "pub mod tcp;\nmod udp { pub mod socket; }\n",
        "src/net/tcp.rs": "use super::udp::socket::Socket;\nuse crate::net;\n",
        "src/net/udp/socket.rs": "use super::super::tcp;\n",
        "src/main.rs": "mod cli;\nfn main() {}\n",
        "src/cli.rs": "use crate::main_helper;\n",
        "tools/other.rs": "use crate::net;\n",
    }
    assert edges(sources, sources) == [
        ("src/cli.rs", "src/main.rs"),  # crate::main_helper is an item of the binary's root
        ("src/lib.rs", "src/net/mod.rs"),
        ("src/lib.rs", "src/net/tcp.rs"),  # a bare path through a child module
        ("src/main.rs", "src/cli.rs"),
        ("src/net/mod.rs", "src/net/tcp.rs"),
        ("src/net/mod.rs", "src/net/udp/socket.rs"),
        ("src/net/tcp.rs", "src/net/mod.rs"),
        ("src/net/tcp.rs", "src/net/udp/socket.rs"),
        ("src/net/udp/socket.rs", "src/net/tcp.rs"),
    ]


def test_path_attribute_in_non_mod_rs_file():
    sources = {
        "Cargo.toml": '[package]\nname = "x"\n',
        "src/lib.rs": "mod a;\n",
        "src/a.rs": '#[path = "other.rs"]\nmod b;\nmod c { #[path = "deep.rs"] mod d; }\n',
        "src/other.rs": "",
        "src/a/c/deep.rs": "",
    }
    assert edges(sources, sources) == [
        ("src/a.rs", "src/a/c/deep.rs"),  # inside an inline block the path starts at the module's directory
        ("src/a.rs", "src/other.rs"),  # outside, at the file's own directory
        ("src/lib.rs", "src/a.rs"),
    ]


def definitions_of(parsed, path):
    source = (ROOT / path).read_bytes()
    return [(d.name, d.kind, d.depth, d.returns, source[d.start : d.end].decode()) for d in parsed[path].definitions]


def test_definitions(parsed):
    found = definitions_of(parsed, "core-lib/src/shapes/circle.rs")
    assert [x[:4] for x in found] == [
        ("Circle", "struct", 0, None),
        ("PI", "const", 0, None),
        ("COUNT", "static", 0, None),
        ("Radius", "type", 0, None),
        ("Kind", "enum", 0, None),
        ("Bits", "union", 0, None),
        ("Shape", "trait", 0, None),
        ("area", "method", 1, None),
        ("name", "method", 1, '"shape"'),
        ("impl Circle", "impl", 0, None),
        ("new", "method", 1, "Circle { r }"),
        ("diameter", "method", 1, "self.r * 2.0"),
        ("classify", "method", 1, None),  # an early return and a tail: two exits
        ("impl Shape for Circle", "impl", 0, None),
        ("area", "method", 1, "PI * square(self.r)"),  # the closure's return is the closure's
        ("circle", "macro", 0, None),
        ("helper", "function", 0, "util::is_square(s)"),
    ]
    text = {(name, kind): body for name, kind, _, _, body in found}
    assert text["Circle", "struct"] == "/// A circle.\n#[derive(Debug, Clone)]\npub struct Circle {\n    pub r: f64,\n}"
    assert text["PI", "const"] == "pub const PI: f64 = 3.14;"  # a plain comment is not a doc comment
    assert text["area", "method"].startswith("fn area(&self) -> f64 {\n        let square")
    assert (
        text["diameter", "method"]
        == "#[must_use]\n    pub fn diameter(&self) -> f64 {\n        return self.r * 2.0;\n    }"
    )
    assert text["Shape", "trait"].startswith("/// Shapes with an area.\npub trait Shape {") and text[
        "Shape", "trait"
    ].endswith('"shape"\n    }\n}')
    assert text["circle", "macro"] == "macro_rules! circle {\n    ($r:expr) => {\n        Circle::new($r)\n    };\n}"
    trait_area = [body for name, kind, depth, _, body in found if name == "area" and depth == 1][0]
    assert trait_area == "/// The area.\n    fn area(&self) -> f64;"


def test_inline_module_members(parsed):
    assert definitions_of(parsed, "core-lib/src/lib.rs") == [
        (
            "inline",
            "mod",
            0,
            None,
            "mod inline {\n    pub mod nested;\n\n    pub fn inline_fn() -> u8 {\n        7\n    }\n}",
        ),
        ("inline_fn", "function", 1, "7", "pub fn inline_fn() -> u8 {\n        7\n    }"),
        (
            "area",
            "function",
            0,
            "c.r * c.r * 3.0",
            "/// Area of a circle.\n#[inline]\npub fn area(c: &Circle) -> f64 {\n    c.r * c.r * 3.0\n}",
        ),
    ]
    assert parsed["core-lib/src/lib.rs"].errors is False
