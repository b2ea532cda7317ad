from hypothesis import given, settings
from hypothesis import strategies as st

from polyglot import PATHS, ROOT, edges, syntax

from mlx_ltc.data.syntax import language_of, parse
from mlx_ltc.data.syntax.python import Resolver


def spans(path):
    source = (ROOT / path).read_bytes()
    return {d.name: source[d.start : d.end].decode() for d in syntax(path).definitions}


def test_edges():
    assert edges("py") == {
        ("py/app/__init__.py", "py/app/core.py"),  # re-export `from .core import Engine`
        ("py/app/__init__.py", "py/app/util/__init__.py"),  # `from . import util`: a subpackage
        ("py/app/core.py", "py/app/compat.py"),  # in try/except
        ("py/app/core.py", "py/app/models/__init__.py"),  # `from app.models import Model`: the package
        ("py/app/core.py", "py/app/models/user.py"),  # inside a method
        ("py/app/core.py", "py/app/service.py"),  # under TYPE_CHECKING, a cycle with service.py
        ("py/app/core.py", "py/app/util/strings.py"),  # `import a.b.c`: the module itself only
        ("py/app/core.py", "py/src/libtwo/api.py"),  # src/ layout
        ("py/app/models/__init__.py", "py/app/models/base.py"),
        ("py/app/models/__init__.py", "py/app/models/user.py"),  # wildcard
        ("py/app/models/base.py", "py/app/util/strings.py"),  # `from ..util.strings import slug`
        ("py/app/models/user.py", "py/app/models/base.py"),  # `from . import base` and `from .base import`
        ("py/app/service.py", "py/app/core.py"),
        ("py/app/service.py", "py/app/fast.py"),  # the module, not its .pyi stub
        ("py/app/util/strings.py", "py/app/__init__.py"),  # function-level `import app`
        ("py/scripts/helpers.py", "py/app/__init__.py"),  # app.native is missing (an extension): its package
        ("py/scripts/run.py", "py/app/core.py"),
        ("py/scripts/run.py", "py/ns/plugins/hello.py"),  # namespace package
        ("py/scripts/run.py", "py/scripts/helpers.py"),  # a script's own directory is on sys.path, not py/setup.py
        ("py/setup.py", "py/app/__init__.py"),
        ("py/src/libtwo/api.py", "py/src/libtwo/__init__.py"),  # `from libtwo import __version__`
    }


def test_import_specs():
    assert syntax("py/app/core.py").imports == [
        "json",
        "app.util.strings",
        "typing:TYPE_CHECKING",
        "numpy",
        "app.models:Model",
        "libtwo.api:answer",
        "app.service:Service",
        "ujson",
        ".:compat",
        ".models.user:User",
    ]
    assert syntax("py/app/models/__init__.py").imports == [".base:Model", ".user:*"]
    assert syntax("py/src/libtwo/api.py").imports == ["libtwo:__version__", "...:outside", ".....:beyond_the_repo"]


def test_definitions():
    found = [(d.name, d.kind, d.depth, d.returns) for d in syntax("py/app/core.py").definitions]
    assert found == [
        ("dataclass_like", "function", 0, "cls"),
        ("Engine", "class", 0, None),
        ("name", "method", 1, '"engine"'),
        ("run", "method", 1, None),  # two returns
        ("close", "method", 1, "helper()"),  # the nested function's return doesn't count
        ("dumps", "function", 0, "fastjson.dumps(np.asarray(x), default=json.dumps)"),
    ]
    text = spans("py/app/core.py")
    assert text["Engine"].startswith("# The engine runs models.\n# It is the heart of the app.\n@dataclass_like\nclass")
    assert text["Engine"].endswith("        await helper()\n        return helper()")
    assert text["name"] == '@property\n    def name(self):\n        return "engine"'
    assert text["dumps"] == "def dumps(x):\n    return fastjson.dumps(np.asarray(x), default=json.dumps)"


def test_leading_comments_and_nesting():
    source = (
        b"x = 1  # trailing, not leading\n"
        b"def f():\n    return x\n"
        b"# detached by a blank line\n\n"
        b"# attached\n@dec\nclass C:  # header\n"
        b"    # first member\n    def a(self):\n        pass\n"
        b"    # second member\n\n    @staticmethod\n    def b():\n        return\n"
        b"    class Inner:\n        def deep(self):\n            return 1\n"
        b"if True:\n    def hidden():\n        pass\n"
    )
    syn = parse("m.py", source)
    found = [(d.name, d.kind, d.depth, d.returns, source[d.start : d.end].split(b"\n")[0]) for d in syn.definitions]
    assert found == [
        ("f", "function", 0, "x", b"def f():"),
        ("C", "class", 0, None, b"# attached"),
        ("a", "method", 1, None, b"# first member"),
        ("b", "method", 1, None, b"@staticmethod"),  # a bare return has no value
        ("Inner", "class", 1, None, b"class Inner:"),
    ]
    assert not syn.errors


def test_spans_nest():
    for path in PATHS:
        if path.startswith("py/") and path.endswith(".py"):
            outer = None
            for d in syntax(path).definitions:
                assert 0 <= d.start < d.end
                if d.depth == 0:
                    assert outer is None or outer.end <= d.start
                    outer = d
                else:
                    assert outer.start <= d.start < d.end <= outer.end


def test_resolver_roots():
    paths = ["a/utils/__init__.py", "a/utils/x.py", "b/utils/__init__.py", "b/main.py", "b/tool.py", "b/utils/y.pyi"]
    paths += ["src/pkg/__init__.py", "src/pkg/mod.py", "src/pkg/mod/__init__.py", "conftest.py"]
    r = Resolver(paths, None)
    assert r.resolve("b/main.py", "utils") == ["b/utils/__init__.py"]  # its own project first
    assert r.resolve("a/utils/x.py", "utils:y") == ["a/utils/__init__.py"]
    assert r.resolve("b/main.py", "utils:y") == ["b/utils/y.pyi"]  # a stub-only module
    assert r.resolve("b/main.py", "tool") == ["b/tool.py"]
    assert r.resolve("a/utils/x.py", "tool") == []  # a script beside a package isn't importable
    assert r.resolve("b/main.py", "pkg.mod") == ["src/pkg/mod/__init__.py"]  # a package before a module
    assert r.resolve("src/pkg/mod.py", "conftest") == ["conftest.py"]
    assert r.resolve("conftest.py", "...:x") == []


def test_languages():
    assert language_of("a/b.py") == language_of("a/b.pyi") == "python"
    assert parse("notes.txt", b"import os\n") is None
    assert parse("module.pyc", b"") is None
    assert parse("stub.pyi", b"import os\ndef f() -> int: ...\n").imports == ["os"]
    assert parse("broken.py", b"def f(:\n").errors


TOKENS = "def |class |return |import |from | as |.|x|y|(|)|:|\n|    |@|# c|,|*|'s'|=|1".split("|")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS)).map("".join))
def test_any_source(code):
    """Whatever the source, parsing neither fails nor yields spans outside it."""
    source = code.encode()
    syn = parse("m.py", source)
    assert all(isinstance(spec, str) for spec in syn.imports)
    for d in syn.definitions:
        assert 0 <= d.start <= d.end <= len(source) and d.depth in (0, 1)
