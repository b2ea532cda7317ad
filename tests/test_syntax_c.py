from pathlib import Path

import pytest

from mlx_ltc.data import syntax

ROOT = Path(__file__).parent / "fixtures" / "polyglot" / "c"


@pytest.fixture(scope="module")
def repo():
    paths = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file())
    return paths, {p: syntax.parse(p, (ROOT / p).read_bytes()) for p in paths}


def definitions_of(parsed, path):
    source = (ROOT / path).read_bytes()
    return [(d.name, d.kind, d.depth, d.returns, source[d.start : d.end].decode()) for d in parsed[path].definitions]


def test_edges(repo):
    paths, parsed = repo
    assert syntax.resolve_all(parsed, paths, lambda p: (ROOT / p).read_text()) == [
        ("include/geo/canvas.h", "include/geo/point.h"),
        ("include/geo/point.h", "include/geo/config.h"),  # "geo/config.h" through include/
        ("include/geo/shape.hpp", "include/geo/canvas.h"),
        ("include/geo/shape.hpp", "include/geo/point.h"),  # <geo/point.h>: a project header in angle brackets
        ("src/internal.h", "config.h"),  # the repository root is an include directory; util.h is ambiguous
        ("src/point.c", "include/geo/point.h"),
        ("src/point.c", "src/internal.h"),
        ("src/shape.cpp", "include/geo/shape.hpp"),  # ../
        ("src/shape.cpp", "lib/extra/extra.h"),  # inside #ifdef, by its unique path suffix
        ("tests/test_point.c", "include/geo/point.h"),
        ("tests/test_point.c", "src/internal.h"),
        ("tests/test_point.c", "src/point.c"),
    ]


def test_import_specs(repo):
    _, parsed = repo
    assert parsed["src/point.c"].imports == ["<stdio.h>", "<math.h>", '"geo/point.h"', '"internal.h"']
    assert parsed["src/shape.cpp"].imports == ['"../include/geo/shape.hpp"', "<string>", '"extra/extra.h"']
    assert parsed["include/geo/point.h"].language == "c"
    assert parsed["include/geo/shape.hpp"].language == "cpp"


def test_c_header(repo):
    _, parsed = repo
    found = definitions_of(parsed, "include/geo/point.h")
    assert found == [
        ("GEO_MAX", "macro", 0, None, "/* Largest of two values. */\n#define GEO_MAX(a, b) ((a) > (b) ? (a) : (b))"),
        ("GEO_ORIGIN", "macro", 0, None, "#define GEO_ORIGIN 0"),  # the include guard is no definition
        ("point", "struct", 0, None, "/** A point in the plane. */\nstruct point {\n    double x, y;\n};"),
        ("rect", "typedef", 0, None, "typedef struct {\n    struct point lo, hi;\n} rect;"),
        ("coord_t", "typedef", 0, None, "typedef int coord_t;"),
        ("color", "enum", 0, None, "enum color { RED, GREEN };"),
        (
            "point_dot",
            "function",
            0,
            "a->x * b->x + a->y * b->y",
            "// Squared distance.\nstatic inline double point_dot(const struct point *a, const struct point *b) {\n"
            "    return a->x * b->x + a->y * b->y;\n}",
        ),
    ]


def test_cpp_header(repo):
    _, parsed = repo
    found = definitions_of(parsed, "include/geo/shape.hpp")
    assert [x[:4] for x in found] == [
        ("geo", "namespace", 0, None),
        ("Shape", "class", 1, None),
        ("clamp", "function", 1, "v < lo ? lo : (v > hi ? hi : v)"),
        ("count", "function", 1, "1"),
        ("Registry", "class", 0, None),
        ("Registry", "method", 1, None),
        ("size", "method", 1, "n_"),
        ("has", "method", 1, "false"),
        ("Box", "struct", 0, None),
        ("get", "method", 1, "value"),
    ]
    text = {(name, kind): body for name, kind, _, _, body in found}
    assert text["Shape", "class"].startswith("/// Base shape.\nclass Shape {") and text["Shape", "class"].endswith("};")
    assert text["clamp", "function"].startswith("template <typename T>\nT clamp(")
    assert text["size", "method"] == "/// Number of shapes.\n    int size() const { return n_; }"
    assert text["has", "method"].startswith("template <typename S>\n    bool has() const {")
    assert text["Box", "struct"].startswith("template <typename T>\nstruct Box {") and text["Box", "struct"].endswith(
        "};"
    )
    assert text["geo", "namespace"].endswith("inline int count() { return 1; }\n\n}")


def test_cpp_in_dot_h_is_read_as_cpp(repo):
    _, parsed = repo
    assert parsed["include/geo/canvas.h"].errors is True  # the C parse
    assert [x[:4] for x in definitions_of(parsed, "include/geo/canvas.h")] == [
        ("geo", "namespace", 0, None),
        ("Canvas", "class", 1, None),
    ]
    assert parsed["include/geo/canvas.h"].imports == ['"point.h"']


def test_cpp_source(repo):
    _, parsed = repo
    assert [x[:4] for x in definitions_of(parsed, "src/shape.cpp")] == [
        ("geo::Shape::area", "function", 0, "0.0"),
        ("Registry::add", "function", 0, None),
        ("shape_count", "function", 0, "geo::count()"),  # inside extern "C" { }
        ("shape_version", "function", 0, "2"),
        ("", "namespace", 0, None),
        ("hidden", "function", 1, "3"),
    ]
    assert [x[:4] for x in definitions_of(parsed, "src/point.c")] == [
        ("point_norm", "function", 0, "sqrt(point_dot(p, p))"),
        ("clamp_int", "function", 0, None),
    ]
