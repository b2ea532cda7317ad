from hypothesis import given, settings
from hypothesis import strategies as st

from polyglot import described, edges, syntax

from mlx_ltc.data.syntax import language_of, parse
from mlx_ltc.data.syntax.java import Resolver

MAIN = "java/src/main/java/com/acme"


def test_edges():
    assert edges("java") == {
        ("java/Main.java", f"{MAIN}/app/App.java"),  # from the default package
        ("java/legacy/Misplaced.java", f"{MAIN}/util/Numbers.java"),
        (f"{MAIN}/app/App.java", f"{MAIN}/app/Service.java"),  # a cycle with Service
        (f"{MAIN}/app/App.java", f"{MAIN}/model/Color.java"),  # static wildcard
        (f"{MAIN}/app/App.java", f"{MAIN}/model/User.java"),  # nested class User.Builder
        (f"{MAIN}/app/App.java", f"{MAIN}/util/Numbers.java"),  # wildcard: every file of the package
        (f"{MAIN}/app/App.java", f"{MAIN}/util/Strings.java"),  # the wildcard and a static import
        (f"{MAIN}/app/Service.java", f"{MAIN}/app/App.java"),
        (f"{MAIN}/app/Service.java", f"{MAIN}/model/User.java"),
        (f"{MAIN}/model/User.java", f"{MAIN}/util/Strings.java"),
        ("java/src/test/java/com/acme/app/AppTest.java", "java/legacy/Misplaced.java"),  # by package, not directory
        ("java/src/test/java/com/acme/app/AppTest.java", f"{MAIN}/model/Color.java"),
        ("java/src/test/java/com/acme/app/AppTest.java", f"{MAIN}/model/User.java"),
    }


def test_import_specs():
    assert syntax(f"{MAIN}/app/App.java").imports == [
        "com.acme.util.*",
        "static com.acme.util.Strings.join",
        "static com.acme.model.Color.*",
        "com.acme.model.User.Builder",
        "com.acme.app.Service",
        "java.util.List",
    ]


def test_definitions():
    found = described(f"{MAIN}/app/App.java")
    assert [d[:4] for d in found] == [
        ("App", "class", 0, None),
        ("count", "field", 1, None),
        ("limit", "field", 1, None),  # one entry per declarator
        ("App", "constructor", 1, None),
        ("toString", "method", 1, 'join(List.of("app", String.valueOf(count)))'),
        ("service", "method", 1, None),  # two returns; the lambda's bare return is its own
        ("Config", "class", 1, None),
        ("Mode", "enum", 1, None),
    ]
    assert found[0][4].startswith("/**\n * The application.\n */\n@Deprecated\npublic class App {")
    assert found[0][4].endswith("public enum Mode { DEV, PROD }\n}")
    assert found[1][4] == "// How many users.\n    private int count = 0, limit = 10;"
    assert found[3][4] == "/** Makes an app. */\n    public App() {\n        this.count = Numbers.ZERO;\n    }"
    assert found[4][4].startswith("@Override\n    public String toString() {")
    assert [d[:4] for d in described(f"{MAIN}/util/Numbers.java")] == [
        ("Numbers", "interface", 0, None),
        ("ZERO", "field", 1, None),
        ("zero", "method", 1, "ZERO"),
    ]
    assert [d[:4] for d in described(f"{MAIN}/model/Color.java")] == [
        ("Color", "enum", 0, None),
        ("next", "method", 1, "values()[(ordinal() + 1) % values().length]"),  # members after the constants
    ]
    assert [d[:3] for d in described(f"{MAIN}/model/User.java")] == [("User", "record", 0), ("Builder", "class", 1)]
    assert [d[:3] for d in described("java/legacy/Misplaced.java")] == [
        ("Misplaced", "annotation", 0),
        ("value", "method", 1),
    ]


def test_resolver_details():
    files = {
        "a/src/p/Dup.java": "package p;\nclass Dup {}",
        "b/src/p/Dup.java": "// package q;\n/* package r; */\npackage p;\nclass Dup {}",
        "b/src/p/User.java": "package p; import p.Dup;",
    }
    r = Resolver(sorted(files), files.__getitem__)
    assert r.resolve("b/src/p/User.java", "p.Dup") == ["b/src/p/Dup.java"]  # the nearer of two copies
    assert r.resolve("a/src/p/Dup.java", "p.User.Inner.Deeper") == ["b/src/p/User.java"]
    assert sorted(r.resolve("x.java", "p.*")) == sorted(files)
    assert r.resolve("b/x.java", "static p.Dup.*") == ["b/src/p/Dup.java"]
    assert r.resolve("x.java", "q.Dup") == r.resolve("x.java", "java.util.*") == []


def test_languages():
    assert language_of("src/A.java") == "java"
    assert parse("A.class", b"") is None
    assert parse("A.kt", b"class A") is None
    syn = parse("A.java", b"class A { int f() { return 1; }")
    assert syn.errors


TOKENS = (
    "class |interface |enum |record |@interface |import |static |package |return "
    "|a.b|.*|x|(|)|{|}|;|\n|/** c */|// c|@A |int |=|,"
).split("|")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS)).map("".join))
def test_any_source(code):
    """Whatever the source, parsing neither fails nor yields spans outside it."""
    source = code.encode()
    syn = parse("M.java", source)
    assert all(isinstance(spec, str) for spec in syn.imports)
    for d in syn.definitions:
        assert 0 <= d.start <= d.end <= len(source) and d.depth in (0, 1)
