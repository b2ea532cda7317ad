"""The multi-language fixture repo (tests/fixtures/polyglot) and helpers the syntax tests share."""

from pathlib import Path

from mlx_ltc.data.syntax import parse, resolve_all

ROOT = Path(__file__).parent / "fixtures" / "polyglot"
PATHS = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file())


def read(path):
    return (ROOT / path).read_text()


def syntax(path):
    return parse(path, (ROOT / path).read_bytes())


def edges(subdir):
    """Resolved import edges of the files under `subdir`, against the whole fixture repo."""
    syntaxes = {p: syntax(p) for p in PATHS if p.startswith(subdir + "/")}
    return {(a, b) for a, b in resolve_all(syntaxes, PATHS, read)}


def described(path):
    source = (ROOT / path).read_bytes()
    return [(d.name, d.kind, d.depth, d.returns, source[d.start : d.end].decode()) for d in syntax(path).definitions]
