"""Java: imports, top-level types and their members, and resolution of class names to files.

Import specs: "a.b.C" and "a.b.*" for `import a.b.C;` / `import a.b.*;`, "static a.b.C.m" and
"static a.b.C.*" for static imports.
"""

import posixpath
import re
from functools import cache

import tree_sitter
import tree_sitter_java

from mlx_ltc.data.syntax import Definition
from mlx_ltc.data.syntax._nodes import owner_returns, single_return, text, with_leading_comments

LANGUAGES = {"java": (".java",)}


@cache
def grammar(language):
    return tree_sitter.Language(tree_sitter_java.language())


def imports(root, source, language) -> list:
    specs = []
    for node in root.children:
        if node.type != "import_declaration":
            continue
        names = [c for c in node.named_children if c.type in ("scoped_identifier", "identifier")]
        if not names:
            continue
        name = "".join(text(names[0], source).split())
        if any(c.type == "asterisk" for c in node.children):
            name += ".*"
        static = any(c.type == "static" for c in node.children)
        specs.append(f"static {name}" if static else name)
    return specs


_TYPES = {
    "class_declaration": "class",
    "interface_declaration": "interface",
    "enum_declaration": "enum",
    "record_declaration": "record",
    "annotation_type_declaration": "annotation",
}
_MEMBERS = {
    "method_declaration": "method",
    "constructor_declaration": "constructor",
    "compact_constructor_declaration": "constructor",
    "annotation_type_element_declaration": "method",
    "field_declaration": "field",
    "constant_declaration": "field",
    **_TYPES,
}
_COMMENTS = ("line_comment", "block_comment")
_RETURN = re.compile(rb"\breturn\b")
_FUNCTIONS = ("method_declaration", "constructor_declaration", "compact_constructor_declaration", "lambda_expression")


def names_of(node, source):
    """A member's names: one per declarator for `int a, b;`."""
    name = node.child_by_field_name("name")
    if name is not None:
        return [text(name, source)]
    if node.type in ("field_declaration", "constant_declaration"):
        declarators = node.children_by_field_name("declarator")
        return [text(d.child_by_field_name("name"), source) for d in declarators if d.child_by_field_name("name")]
    return []


def body_members(body):
    """The member nodes of a type body; an enum's members follow its constants."""
    for child in body.children:
        if child.type == "enum_body_declarations":
            yield from child.children
        else:
            yield child


def definitions(root, source, language) -> list:
    returns = owner_returns(root, source, _RETURN, _FUNCTIONS)
    found = []
    for node, start in with_leading_comments(root.children, -1, _COMMENTS):
        kind = _TYPES.get(node.type)
        name = node.child_by_field_name("name")
        if kind is None or name is None:
            continue
        found.append(Definition(text(name, source), kind, start, node.end_byte))
        body = node.child_by_field_name("body")
        if body is None:
            continue
        for member, member_start in with_leading_comments(body_members(body), body.start_point.row, _COMMENTS):
            kind = _MEMBERS.get(member.type)
            if kind is None:
                continue
            value = single_return(member, returns, source, _COMMENTS) if kind == "method" else None
            for name in names_of(member, source):
                found.append(Definition(name, kind, member_start, member.end_byte, 1, value))
    return found


_PACKAGE = re.compile(r"^\s*package\s+([\w.\s]+?)\s*;", re.M)


def _shared_prefix(a, b):
    return len(posixpath.commonprefix([a, b]))


class Resolver:
    """Classes are found by their files: `package a.b;` in `C.java` declares a.b.C, wherever the file is."""

    def __init__(self, paths, read):
        self.classes = {}  # "a.b.C" -> files declaring it (several in multi-module repos)
        self.packages = {}  # "a.b" -> files
        for path in paths:
            if not path.endswith(".java"):
                continue
            try:
                m = _PACKAGE.search(read(path))
            except (OSError, UnicodeDecodeError):
                continue
            package = "".join(m.group(1).split()) if m else ""
            stem = path.rpartition("/")[2][: -len(".java")]
            self.classes.setdefault(f"{package}.{stem}".lstrip("."), []).append(path)
            self.packages.setdefault(package, []).append(path)

    def _class(self, src, name):
        """The file of a class, or of the outermost class for a nested one (a.b.Outer.Inner)."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            files = self.classes.get(".".join(parts[:end]))
            if files:
                return [max(files, key=lambda f: _shared_prefix(f, src))]
        return []

    def resolve(self, src, spec) -> list:
        static = spec.startswith("static ")
        name = spec.removeprefix("static ")
        if name.endswith(".*"):
            name = name[:-2]
            if not static and name in self.packages:
                return list(self.packages[name])
            return self._class(src, name)
        if static:
            name = name.rpartition(".")[0]  # the member's class
        return self._class(src, name)
