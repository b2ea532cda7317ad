import json

from hypothesis import given, settings
from hypothesis import strategies as st

from polyglot import ROOT, described, edges, syntax

from mlx_ltc.data.syntax import language_of, parse
from mlx_ltc.data.syntax.javascript import Resolver, loose_json


def test_edges():
    assert edges("js") == {
        ("js/packages/logger/setup.js", "js/packages/logger/src/index.ts"),  # "./src/index.js" names the TS source
        ("js/src/app/App.tsx", "js/src/app/App.css"),
        ("js/src/app/App.tsx", "js/src/app/store.ts"),  # a cycle with store.ts
        ("js/src/app/App.tsx", "js/src/util/helper.js"),
        ("js/src/app/index.ts", "js/src/app/App.tsx"),  # re-export
        ("js/src/app/index.ts", "js/src/app/store.ts"),  # `export * from "@app/store"`: tsconfig paths
        ("js/src/app/store.ts", "js/src/app/App.tsx"),  # `import type`
        ("js/src/index.ts", "js/packages/logger/setup.js"),  # a workspace package's subpath
        ("js/src/index.ts", "js/packages/logger/src/index.ts"),  # its entry ("source"; "main" is not built)
        ("js/src/index.ts", "js/src/app/index.ts"),  # a directory's index
        ("js/src/index.ts", "js/src/config.ts"),  # an exact tsconfig alias
        ("js/src/index.ts", "js/src/lazy.tsx"),  # dynamic import()
        ("js/src/index.ts", "js/src/util/strings.ts"),  # `export * from "./util/strings.js"`
        ("js/src/lazy.tsx", "js/src/util/legacy.cjs"),  # `import x = require(...)`
        ("js/src/types.d.ts", "js/src/config.ts"),
        ("js/src/util/helper.js", "js/src/util/strings.ts"),  # require()
        ("js/src/util/legacy.cjs", "js/src/util/helper.js"),  # require(`...`) without substitutions
    }


def test_import_specs():
    assert syntax("js/src/index.ts").imports == [
        "react",
        "./app",
        "~config",
        "@polyglot/logger",
        "@polyglot/logger/setup",
        "../../../outside",
        "./util/strings.js",
        "./lazy",
    ]
    assert syntax("js/src/util/legacy.cjs").imports == ["./helper"]  # the computed require is dropped


def test_definitions():
    assert described("js/src/index.ts") == [
        ("start", "function", 0, "new App(config)", _slice("js/src/index.ts", "/** Starts", "App(config);\n}")),
        ("lazy", "function", 0, 'import("./lazy")', 'export const lazy = () => import("./lazy");'),
        ("Runner", "class", 0, None, _slice("js/src/index.ts", "export default class", "  }\n}")),
        ("run", "method", 1, 'start({ name: "x" })', 'run() {\n    return start({ name: "x" });\n  }'),
    ]
    found = described("js/src/app/App.tsx")
    assert [d[:4] for d in found] == [
        ("App", "class", 0, None),
        ("constructor", "method", 1, None),
        ("render", "method", 1, None),  # two returns
        ("onClick", "method", 1, "helper(1)"),  # an arrow-function field
        ("create", "method", 1, "make()"),  # the inner arrow's return doesn't count
        ("observer", "function", 0, "cls"),
    ]
    assert found[0][4].startswith("// The root component.\n// Holds the store.\n@observer\nexport class App {\n")
    assert found[4][4].startswith("static create(): App {") and found[4][4].endswith("return make();\n  }")
    assert [d[:3] for d in described("js/src/config.ts")] == [
        ("Config", "interface", 0),
        ("Mode", "type", 0),
        ("Level", "enum", 0),
    ]
    assert described("js/src/util/strings.ts")[1][:4] == ("shout", "function", 0, 'text.toUpperCase() + "!"')


def _slice(path, first, last):
    source = (ROOT / path).read_text()
    start = source.index(first)
    return source[start : source.index(last, start) + len(last)]


def test_declarations():
    source = b"""
// detached

declare function f(a: string): void;
export default function () {}
namespace N { export const z = 1 }
const A = class {}, g = function* () {}, n = 3;
export abstract class B {
  abstract m(): void;
  x = 1;
}
"""
    syn = parse("m.ts", source)
    assert [(d.name, d.kind, d.depth) for d in syn.definitions] == [
        ("f", "function", 0),
        ("default", "function", 0),
        ("N", "namespace", 0),
        ("A", "class", 0),
        ("g", "function", 0),
        ("B", "class", 0),
        ("m", "method", 1),
    ]
    assert source[syn.definitions[0].start :].startswith(b"declare function")


def test_resolver_details():
    paths = ["web/tsconfig.json", "web/tsconfig.base.json", "web/src/lib/a.ts", "web/src/b.mts", "web/src/c.js"]
    configs = {
        "web/tsconfig.json": '{"extends": "./tsconfig.base", "compilerOptions": {"strict": true}}',
        "web/tsconfig.base.json": '{"compilerOptions": {"baseUrl": "src", "paths": {"#lib/*": ["lib/*"]}}}',
    }
    r = Resolver(paths, configs.__getitem__)
    assert r.resolve("web/src/c.js", "#lib/a") == ["web/src/lib/a.ts"]  # paths relative to baseUrl
    assert r.resolve("web/src/c.js", "lib/a") == ["web/src/lib/a.ts"]  # baseUrl alone
    assert r.resolve("web/src/lib/a.ts", "../b.mjs") == ["web/src/b.mts"]
    assert r.resolve("web/src/lib/a.ts", "../c?raw") == ["web/src/c.js"]
    assert r.resolve("web/src/lib/a.ts", "lodash") == []
    assert r.resolve("c.js", "/abs/path") == []
    assert loose_json('{"a": "http://x", /* c */ "b": [1,],}') == {"a": "http://x", "b": [1]}


def test_package_maps():
    manifest = {
        "name": "@x/core",
        "exports": {".": {"types": "./dist/index.d.ts", "import": "./dist/index.mjs"}, "./utils/*": "./dist/u/*.js"},
        "imports": {"#internal/*": "./src/internal/*.ts", "#dep": "lodash"},
    }
    files = {"pk/core/package.json": json.dumps(manifest), "pk/app/package.json": '{"name": "app", "main": "main.js"}'}
    paths = [*files, "pk/core/src/index.ts", "pk/core/src/u/a.ts", "pk/core/src/internal/x.ts", "pk/app/main.js"]
    r = Resolver(paths, files.__getitem__)
    assert r.resolve("pk/app/main.js", "@x/core") == ["pk/core/src/index.ts"]  # dist/ isn't committed: its source
    assert r.resolve("pk/app/main.js", "@x/core/utils/a") == ["pk/core/src/u/a.ts"]
    assert r.resolve("pk/core/src/index.ts", "#internal/x") == ["pk/core/src/internal/x.ts"]
    assert r.resolve("pk/core/src/index.ts", "#dep") == r.resolve("pk/app/main.js", "#internal/x") == []
    assert r.resolve("pk/core/src/index.ts", "app") == ["pk/app/main.js"]


def test_languages():
    assert language_of("x/types.d.ts") == language_of("a.ts") == language_of("a.mts") == "typescript"
    assert language_of("a.tsx") == "tsx"
    assert language_of("a.js") == language_of("a.cjs") == language_of("a.mjs") == language_of("a.jsx") == "javascript"
    assert parse("App.css", b".a { color: red }") is None
    assert parse("package.json", b"{}") is None
    assert parse("a.jsx", b"const A = () => <div/>;\n").definitions[0].returns == "<div/>"


TOKENS = (
    "function |class |return |import |export |from |require|(|)|{|}|=>|x|'./y'|`|;|\n|/** c */|// c|@d |<a>|=|,"
).split("|")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS)).map("".join))
def test_any_source(code):
    """Whatever the source, parsing neither fails nor yields spans outside it."""
    source = code.encode()
    syn = parse("m.tsx", source)
    assert all(isinstance(spec, str) for spec in syn.imports)
    for d in syn.definitions:
        assert 0 <= d.start <= d.end <= len(source) and d.depth in (0, 1)
