"""Syntax of source files from tree-sitter (per-language grammar wheels): imports, top-level
definitions, and resolution of imports to files of the repository.

Each language module (python, javascript, java, rust, go, c) provides
    LANGUAGES: dict[str, tuple[str, ...]]        language name -> file suffixes (".py", ...)
    grammar(language) -> tree_sitter.Language
    imports(root, source, language) -> list[str]  raw import specs, JSON-able, resolver-specific form
    definitions(root, source, language) -> list[Definition]   depth 0 and 1, in source order
    class Resolver: __init__(self, paths, read); resolve(self, src, spec) -> list[str]
where `root` is the parsed tree's root node, `source` the file's UTF-8 bytes, `paths` every file of the
repo (POSIX, relative to its root) and `read(path) -> str` returns a repo file's text (for go.mod,
Cargo.toml, ...). All offsets are byte offsets into `source`.
"""

import importlib
from dataclasses import dataclass, field
from functools import cache

__all__ = ["Definition", "Syntax", "language_of", "line_roles", "parse", "resolver", "resolve_all"]

_MODULES = ("python", "javascript", "java", "rust", "go", "c")


@dataclass
class Definition:
    name: str
    kind: str  # function, class, struct, enum, trait, interface, impl, method, type, const, ...
    start: int  # byte offset where the definition starts, including its decorators / doc comments
    end: int  # byte offset just past it
    depth: int = 0  # 0: top level; 1: a member of a top-level container (class, impl, namespace, ...)
    returns: str | None = None  # functions with exactly one `return <expr>`: the expression's text


@dataclass
class Syntax:
    language: str
    imports: list = field(default_factory=list)  # raw specs for the language's Resolver
    definitions: list = field(default_factory=list)  # Definition, depth 0 and 1, in source order
    errors: bool = False  # the tree has ERROR or MISSING nodes

    def to_dict(self) -> dict:  # dataclasses.asdict deep-copies: 10x slower on big files
        return {
            "language": self.language,
            "imports": self.imports,
            "errors": self.errors,
            "definitions": [vars(d) for d in self.definitions],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Syntax":
        return cls(d["language"], d["imports"], [Definition(**x) for x in d["definitions"]], d["errors"])


@cache
def _module(name):
    return importlib.import_module(f"mlx_ltc.data.syntax.{name}")


@cache
def _suffixes() -> dict:
    table = {}
    for name in _MODULES:
        for language, suffixes in _module(name).LANGUAGES.items():
            for s in suffixes:
                table[s] = (name, language)
    return table


def language_of(path: str) -> str | None:
    """The parser language of a repo path (by suffix), or None when no grammar handles it."""
    entry = _suffix_entry(path)
    return entry[1] if entry else None


def _suffix_entry(path: str):
    name = path.rsplit("/", 1)[-1]
    table = _suffixes()
    for i, ch in enumerate(name):
        if ch == "." and name[i:] in table:  # longest suffix first: ".d.ts" before ".ts"
            return table[name[i:]]
    return None


@cache
def _parser(module: str, language: str):
    import tree_sitter

    return tree_sitter.Parser(_module(module).grammar(language))


def parse(path: str, source: bytes) -> Syntax | None:
    """Imports and top-level definitions of one file, or None when its language has no grammar."""
    entry = _suffix_entry(path)
    if entry is None:
        return None
    module, language = entry
    tree = _parser(module, language).parse(source)
    root = tree.root_node
    m = _module(module)
    return Syntax(language, m.imports(root, source, language), m.definitions(root, source, language), root.has_error)


def resolver(module: str, paths, read):
    return _module(module).Resolver(paths, read)


def resolve_all(syntaxes: dict, paths, read) -> list:
    """Import edges [(src, dst), ...] between repo files, sorted; self-imports dropped.

    syntaxes: path -> Syntax for the parsed files; paths: every file of the repo."""
    paths = sorted(paths)
    by_module = {}
    for path, syn in syntaxes.items():
        entry = _suffix_entry(path)
        if entry and syn is not None:
            by_module.setdefault(entry[0], []).append((path, syn))
    edges = set()
    for module, files in by_module.items():
        r = resolver(module, paths, read)
        for src, syn in files:
            for spec in syn.imports:
                edges.update((src, dst) for dst in r.resolve(src, spec) if dst != src)
    return sorted(edges)


# Node types, across the grammars, whose text is prose rather than code, and those that import.
_PROSE = {"string", "template_string", "string_literal", "raw_string_literal", "interpreted_string_literal",
          "text_block", "concatenated_string", "char_literal"}  # fmt: skip
_IMPORTS = {"import_statement", "import_from_statement", "future_import_statement", "import_declaration",
            "package_declaration", "package_clause", "use_declaration", "extern_crate_declaration",
            "preproc_include"}  # fmt: skip


def line_roles(path: str, source: bytes) -> list | None:
    """What each line of a file starts with, by the node its first non-blank byte lies in: "blank",
    "prose" (a comment or string: docstrings, comment lines, the inside of a multi-line string),
    "import" (an import, package or include statement) or "code". None without a grammar."""
    entry = _suffix_entry(path)
    if entry is None:
        return None
    root = _parser(*entry).parse(source).root_node
    roles, start = [], 0
    for line in source.split(b"\n"):
        stripped = len(line) - len(line.lstrip())
        if stripped == len(line):
            roles.append("blank")
        else:
            b = start + stripped
            node, role = root.descendant_for_byte_range(b, b), "code"
            while node is not None and role == "code":
                if "comment" in node.type or node.type in _PROSE:
                    role = "prose"
                elif node.type in _IMPORTS:
                    role = "import"
                node = node.parent
            roles.append(role)
        start += len(line) + 1
    return roles
