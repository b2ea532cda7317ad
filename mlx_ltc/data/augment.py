"""Semantics-preserving augmentation of source files, driven by tree-sitter parse trees.

rename_locals(source, language, seed) renames function-local variables to fresh names;
strip_comments(source, language) removes comments but keeps docstrings, attributes and directives.
Files that do not parse cleanly, and unsupported languages, come back unchanged.
"""

import builtins
import importlib
import keyword
import random
import re
from functools import cache

import tree_sitter

RENAME_LANGUAGES = ("python", "go")
COMMENT_LANGUAGES = ("python", "go", "rust", "javascript", "typescript", "tsx", "java", "c", "cpp")

_GRAMMARS = {
    "python": ("tree_sitter_python", "language"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
}

_VOCAB = {
    "python": ("value", "item", "tmp", "acc", "result", "current", "entry", "node", "elem", "obj", "data", "part",
               "token", "val", "buf", "res", "out", "cur", "prev", "ref", "record", "chunk", "piece", "state", "total",
               "seq", "text", "temp", "target", "source", "found", "pending", "aux", "holder", "box"),
    "go": ("value", "item", "tmp", "acc", "result", "cur", "entry", "node", "elem", "obj", "data", "part", "tok",
           "val", "buf", "res", "out", "prev", "ref", "rec", "chunk", "piece", "state", "total", "seq", "txt", "temp",
           "target", "src", "found", "pending", "aux", "holder", "box"),
}  # fmt: skip

_RESERVED = {
    "python": set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins)) | {"self", "cls"},
    "go": set(
        "break case chan const continue default defer else fallthrough for func go goto if import interface map "
        "package range return select struct switch type var any append bool byte cap clear close complex complex64 "
        "complex128 copy delete error false float32 float64 imag int int8 int16 int32 int64 iota len make max min "
        "new nil panic print println real recover rune string true uint uint8 uint16 uint32 uint64 uintptr".split()
    ),
}

# A function that reads its own frame can see local names; renaming would change what it sees.
_PY_INTROSPECTION = {"locals", "vars", "eval", "exec", "dir"}
_PY_FRAME_ACCESS = {"_getframe", "currentframe", "f_locals"}
_PY_COMPREHENSIONS = {"list_comprehension", "set_comprehension", "dictionary_comprehension", "generator_expression"}
_PY_TARGETS = {"pattern_list", "tuple_pattern", "list_pattern", "list_splat_pattern", "tuple", "list", "list_splat",
               "parenthesized_expression", "as_pattern_target", "expression_list"}  # fmt: skip
_GO_SCOPES = {"block", "if_statement", "for_statement", "expression_switch_statement", "type_switch_statement",
              "expression_case", "default_case", "type_case", "communication_case", "func_literal"}  # fmt: skip

_COMMENT_TYPES = ("comment", "line_comment", "block_comment")
_KEEP_COMMENT = {
    "go": re.compile(rb"//go:|// \+build|//line |/\*line |//export |//extern "),
    "javascript": re.compile(rb"///\s*<(reference|amd-)|/[/*]\s*@ts-"),
}
_KEEP_COMMENT["typescript"] = _KEEP_COMMENT["tsx"] = _KEEP_COMMENT["javascript"]
_PY_CODING = re.compile(rb"^[ \t\f]*#.*?coding[:=]")
# Go and JavaScript read a comment spanning lines as a line break (semicolon insertion).
_NEWLINE_COMMENTS = {"go", "javascript", "typescript", "tsx"}


@cache
def _parser(language: str) -> tree_sitter.Parser:
    module, function = _GRAMMARS[language]
    return tree_sitter.Parser(tree_sitter.Language(getattr(importlib.import_module(module), function)()))


@cache
def _query(language: str, kinds: tuple) -> tree_sitter.Query:
    lang = _parser(language).language
    return tree_sitter.Query(lang, " ".join(f"({k}) @node" for k in kinds if lang.id_for_node_kind(k, True)))


def _find(root, language: str, kinds: tuple) -> list:
    return tree_sitter.QueryCursor(_query(language, kinds)).captures(root).get("node", [])


def _parse(data: bytes, language: str):
    root = _parser(language).parse(data).root_node
    return None if root.has_error else root


def _text(node) -> str:
    return node.text.decode("utf-8", "surrogatepass")


def _apply(data: bytes, edits) -> str:
    out, pos = [], 0
    for start, end, new in sorted(edits):
        out += [data[pos:start], new.encode()]
        pos = end
    out.append(data[pos:])
    return b"".join(out).decode("utf-8", "surrogatepass")


def _identifiers(root, kinds) -> set:
    names, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node.type in kinds:
            names.add(_text(node))
        stack.extend(node.children)
    return names


def _fresh(rng: random.Random, language: str, old: str, taken: set) -> str:
    prefix = old[: len(old) - len(old.lstrip("_"))] if language == "python" else ""
    vocab = _VOCAB[language]
    for attempt in range(1_000_000):
        name = prefix + rng.choice(vocab) + (str(rng.randrange(2, 10 + attempt)) if attempt >= 3 else "")
        if name not in taken:
            taken.add(name)
            return name
    raise RuntimeError("no fresh name")


def rename_locals(source: str, language: str, seed: int) -> str:
    """Rename local variables of functions to fresh names, consistently within each function."""
    if language not in RENAME_LANGUAGES:
        return source
    data = source.encode("utf-8", "surrogatepass")
    root = _parse(data, language)
    if root is None:
        return source
    if language == "python":
        taken = {_text(n) for n in _find(root, language, ("identifier",))}
        if taken & _PY_FRAME_ACCESS:
            return source
        groups = _python_locals(root)
    else:
        kinds = ("identifier", "type_identifier", "field_identifier", "package_identifier")
        taken = {_text(n) for n in _find(root, language, kinds)}
        groups = _go_locals(root)
    taken |= _RESERVED[language]
    rng = random.Random(seed)
    edits = []
    for name, nodes in groups:
        new = _fresh(rng, language, name, taken)
        edits += [(n.start_byte, n.end_byte, new) for n in nodes]
    return _apply(data, edits) if edits else source


class _PyFunction:
    def __init__(self):
        self.uses = {}  # name -> [(identifier node, ((enclosing _PyComprehension, in its first iterable), ...))]
        self.bound = set()  # bound in the function's own scope (assignment, for, with/except as, walrus)
        self.blocked = set()  # parameters, global/nonlocal, imports, f"{x=}", used by a nested scope
        self.unsafe = False


class _PyComprehension:
    def __init__(self, node):
        self.bound = {n for c in node.named_children if c.type == "for_in_clause" for n in _py_targets(c, "left")}


def _py_targets(node, field):
    names, stack = [], node.children_by_field_name(field)
    while stack:
        node = stack.pop()
        if node.type == "identifier":
            names.append(_text(node))
        elif node.type in _PY_TARGETS:
            stack.extend(node.named_children)
    return names


def _python_locals(root) -> list:
    """[(name, identifier nodes)] for every renameable local, per function, in source order."""
    functions = []
    # (node, function owning this region or None, functions that see it as a nested scope, comprehensions)
    stack = [(root, None, (), ())]
    while stack:
        node, owner, outer, comps = stack.pop()
        kind = node.type
        children = [(c, owner, outer, comps) for c in node.named_children]
        if kind == "identifier":
            name = _text(node)
            if owner and name in _PY_INTROSPECTION:
                owner.unsafe = True
            for f in outer:
                f.blocked.add(name)
            if owner:
                owner.uses.setdefault(name, []).append((node, comps))
        elif kind == "attribute":  # obj.name: only obj is a variable
            children = [(node.child_by_field_name("object"), owner, outer, comps)]
        elif kind == "keyword_argument":  # f(name=value)
            children = [(node.child_by_field_name("value"), owner, outer, comps)]
        elif kind == "function_definition":
            function = _PyFunction()
            functions.append(function)
            function.blocked |= _identifiers(node.child_by_field_name("parameters"), {"identifier"})
            header = outer + (owner,) if owner else outer
            body = node.child_by_field_name("body")
            children = [(c, function, header, ()) if c == body else (c, None, header, ()) for c in node.named_children]
        elif kind in ("lambda", "class_definition"):
            header = outer + (owner,) if owner else outer
            children = [(c, None, header, ()) for c in node.named_children]
        elif kind in _PY_COMPREHENSIONS:
            comp = _PyComprehension(node)
            clauses = [c for c in node.named_children if c.type == "for_in_clause"]
            children = []
            for c in node.named_children:
                if c == clauses[0]:
                    right = c.children_by_field_name("right")
                    children += [(g, owner, outer, comps + ((comp, g in right),)) for g in c.named_children]
                else:
                    children.append((c, owner, outer, comps + ((comp, False),)))
        elif owner is None:
            pass
        elif kind in ("assignment", "augmented_assignment", "for_statement"):
            left = node.child_by_field_name("left")
            if left.type == "identifier" or node.child_by_field_name("right") or kind != "assignment":
                owner.bound.update(_py_targets(node, "left"))  # `(x): int` alone binds nothing
        elif kind == "named_expression":
            owner.bound.update(_py_targets(node, "name"))
        elif kind == "as_pattern":
            owner.bound.update(_py_targets(node, "alias"))
        elif kind in (
            "global_statement",
            "nonlocal_statement",
            "import_statement",
            "import_from_statement",
            "future_import_statement",
        ):
            owner.blocked |= _identifiers(node, {"identifier"})
        elif kind == "interpolation" and any(c.type == "=" for c in node.children):
            owner.blocked |= _identifiers(node, {"identifier"})
        elif kind == "match_statement":  # keyword patterns look like names but are attributes
            owner.unsafe = True
        stack.extend(reversed(children))

    groups = []
    for function in functions:
        if function.unsafe:
            continue
        for name, uses in function.uses.items():
            if name in function.blocked or name == "_" or (name.startswith("__") and name.endswith("__")):
                continue
            if name in function.bound or all(_comprehension_local(name, comps) for _, comps in uses):
                groups.append((name, [n for n, _ in uses]))
    return groups


def _comprehension_local(name: str, comps) -> bool:
    """Whether a use inside these comprehensions refers to a comprehension variable (first iterables run outside)."""
    return any(name in comp.bound and not in_first for comp, in_first in reversed(comps))


def _go_locals(root) -> list:
    package_level = set()
    for decl in root.named_children:
        if decl.type == "function_declaration":
            package_level.add(_text(decl.child_by_field_name("name")))
        elif decl.type in ("var_declaration", "const_declaration", "type_declaration"):
            package_level |= _identifiers(decl, {"identifier", "type_identifier"})
    groups, stack = [], [root]
    while stack:
        node = stack.pop()
        body = (
            node.child_by_field_name("body")
            if node.type in ("function_declaration", "method_declaration", "func_literal")
            else None
        )
        if body is None:
            stack.extend(node.children)
            continue
        groups += _go_function_locals(node, body, package_level)
    return sorted(groups, key=lambda g: g[1][0].start_byte)


def _go_scope_end(node) -> int:
    while node.type not in _GO_SCOPES:
        node = node.parent
    return node.end_byte


def _go_function_locals(function, body, package_level) -> list:
    blocked = set(package_level) | _identifiers(function.child_by_field_name("parameters"), {"identifier"})
    for field in ("receiver", "result", "type_parameters"):
        if function.child_by_field_name(field) is not None:
            blocked |= _identifiers(function.child_by_field_name(field), {"identifier"})
    uses, scopes, declared = {}, {}, set()

    def declare(identifiers, start, end):
        for n in identifiers:
            if n.type == "identifier":
                scopes.setdefault(_text(n), []).append((start, end))
                declared.add(n.start_byte)

    stack = [body]
    while stack:
        node = stack.pop()
        kind = node.type
        if kind == "identifier":
            uses.setdefault(_text(node), []).append(node)
        elif kind == "field_identifier":
            blocked.add(_text(node))
        elif kind in ("parameter_list", "type_parameter_list"):
            blocked |= _identifiers(node, {"identifier"})
            continue
        elif kind == "keyed_element":
            blocked |= _identifiers(node.child_by_field_name("key"), {"identifier"})
        elif kind in ("short_var_declaration", "range_clause", "receive_statement"):
            if any(c.type == ":=" for c in node.children):
                declare(node.child_by_field_name("left").named_children, node.end_byte, _go_scope_end(node))
        elif kind in ("var_spec", "const_spec"):
            declare(node.children_by_field_name("name"), node.end_byte, _go_scope_end(node))
        elif kind == "type_switch_statement" and node.child_by_field_name("alias") is not None:
            declare(
                node.child_by_field_name("alias").named_children,
                node.child_by_field_name("value").end_byte,
                node.end_byte,
            )
        stack.extend(reversed(node.children))

    def in_scope(n, name):
        return n.start_byte in declared or any(s <= n.start_byte < e for s, e in scopes[name])

    return [
        (name, nodes)
        for name, nodes in uses.items()
        if name in scopes and name not in blocked and name != "_" and all(in_scope(n, name) for n in nodes)
    ]


def strip_comments(source: str, language: str) -> str:
    """Remove comments, dropping lines that held nothing else; keep docstrings, attributes and directives."""
    if language not in COMMENT_LANGUAGES:
        return source
    data = source.encode("utf-8", "surrogatepass")
    root = _parse(data, language)
    if root is None:
        return source
    comments = _find(root, language, _COMMENT_TYPES)
    kept = _kept_comments(root, comments, language)
    out, pos = bytearray(), 0
    for node in sorted(comments, key=lambda n: n.start_byte):
        if node.start_byte in kept or node.start_byte < pos:
            continue
        start, end = node.start_byte, node.end_byte
        while end > start and data[end - 1] in b"\r\n":  # Rust doc comments include their newline
            end -= 1
        out += data[pos:start]
        line_start = out.rfind(b"\n") + 1
        head = bytes(out[line_start:])
        line_end = data.find(b"\n", end)
        line_end = len(data) if line_end < 0 else line_end
        tail = data[end:line_end]
        pos = end
        if not tail.strip():
            continued = out[max(0, line_start - 3) : line_start].rstrip(b"\r\n").endswith(b"\\")
            if not head.strip() and not continued:  # a line of comments only: drop it
                del out[line_start:]
                pos = min(line_end + 1, len(data))
                continue
            _rstrip(out)
            pos = line_end - 1 if data[line_end - 1 : line_end] == b"\r" else line_end
        elif head.strip() and b"\n" in data[start:end] and language in _NEWLINE_COMMENTS:
            _rstrip(out)
            out += b"\n"
        elif not head or head[-1:].isspace():
            pos = end + len(tail) - len(tail.lstrip(b" \t"))
        elif not tail[:1].isspace():
            out += b" "  # a comment separates tokens
    out += data[pos:]
    result = bytes(out)
    return source if _parse(result, language) is None else result.decode("utf-8", "surrogatepass")


def _rstrip(out: bytearray):
    while out[-1:] in (b" ", b"\t"):
        del out[-1]


def _kept_comments(root, comments, language) -> set:
    kept = set()
    keep = _KEEP_COMMENT.get(language)
    for node in comments:
        text = node.text
        if language == "python":
            if (node.start_byte == 0 and text.startswith(b"#!")) or (
                node.start_point.row <= 1 and _PY_CODING.match(text)
            ):
                kept.add(node.start_byte)
        elif keep is not None and keep.match(text):
            kept.add(node.start_byte)
    if language == "go":  # the cgo preamble is C code
        for decl in root.named_children:
            if decl.type == "import_declaration" and b'"C"' in decl.text:
                prev = decl.prev_sibling
                while prev is not None and prev.type == "comment":
                    kept.add(prev.start_byte)
                    prev = prev.prev_sibling
    return kept
