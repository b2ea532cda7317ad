"""Go: import paths resolved to package directories through the repository's go.mod files; top-level declarations.

Import specs: the import path as written ("fmt", "example.com/m/pkg/sub"), one per import spec (aliases,
dot and blank imports alike). A path resolves to every non-test .go file of its package directory, found
through the longest module path of a go.mod that prefixes it, else through a vendor/ directory above the
importer. `_test.go` files are targets only for a test file of the same directory (an external `_test`
package importing the package it tests also sees its export_test.go helpers).

Definitions (all depth 0, with the comment lines directly above): funcs, methods named "Type.Method", each spec of a
type declaration (struct, interface or type), and const / var declarations named by their first name. `returns`: the
expression of a func's only return statement when it returns one value (func literals' returns are their own).
"""

import posixpath
import re
from collections import defaultdict
from functools import cache

import tree_sitter as ts
import tree_sitter_go

from mlx_ltc.data.syntax import Definition
from mlx_ltc.data.syntax._nodes import owner_returns, text, with_leading_comments

LANGUAGES = {"go": (".go",)}

_RETURN = re.compile(rb"return\b")  # no leading \b: it would cost re its literal search
_FUNCTIONS = ("function_declaration", "method_declaration", "func_literal")
_TYPE_SPECS = ("type_spec", "type_alias")
_MODULE = re.compile(r"""^\s*module\s+["'`]?([^\s"'`]+)""", re.M)


@cache
def grammar(language="go"):
    return ts.Language(tree_sitter_go.language())


def imports(root, source, language="go"):
    specs = []
    for node in root.named_children:
        if node.type != "import_declaration":
            continue
        for child in node.named_children:
            for spec in child.named_children if child.type == "import_spec_list" else (child,):
                path = spec.child_by_field_name("path") if spec.type == "import_spec" else None
                if path is not None:
                    specs.append(text(path, source)[1:-1])
    return specs


def definitions(root, source, language="go"):
    out, returns = [], None
    for node, start in with_leading_comments(root.named_children, -1):
        kind = node.type
        if kind in ("function_declaration", "method_declaration"):
            if returns is None:
                returns = owner_returns(root, source, _RETURN, _FUNCTIONS)
            name = text(node.child_by_field_name("name"), source)
            if kind == "method_declaration":
                name = f"{_receiver(node, source)}.{name}"
            kind = "function" if kind == "function_declaration" else "method"
            out.append(Definition(name, kind, start, node.end_byte, 0, _single_return(node, returns, source)))
        elif kind == "type_declaration":
            if node.child(1) is not None and node.child(1).type == "(":  # type ( A ..; B .. ): one per spec
                for spec, spec_start in with_leading_comments(node.named_children, node.start_point.row):
                    if spec.type in _TYPE_SPECS:
                        out.append(_type(spec, spec_start, spec.end_byte, source))
            else:
                specs = [c for c in node.named_children if c.type in _TYPE_SPECS]
                if specs:
                    out.append(_type(specs[0], start, node.end_byte, source))
        elif kind in ("const_declaration", "var_declaration"):
            names = _names(node)
            if names:
                out.append(Definition(text(names[0], source), kind.split("_")[0], start, node.end_byte))
    return out


def _receiver(method, source):
    """The receiver's type name: T for `(t *T[K])`."""
    receiver = method.child_by_field_name("receiver")
    params = [p for p in receiver.named_children if p.type == "parameter_declaration"] if receiver else []
    node = params[0].child_by_field_name("type") if params else None
    while node is not None and node.type in ("pointer_type", "generic_type", "parenthesized_type"):
        node = node.child_by_field_name("type") if node.type == "generic_type" else node.named_children[0]
    return text(node, source) if node is not None else ""


def _type(spec, start, end, source):
    value = spec.child_by_field_name("type")
    kind = {"struct_type": "struct", "interface_type": "interface"}.get(value.type if value else "", "type")
    return Definition(text(spec.child_by_field_name("name"), source), kind, start, end)


def _names(declaration):
    for child in declaration.named_children:
        if child.type in ("const_spec", "var_spec"):
            return child.children_by_field_name("name")
        if child.type == "var_spec_list":
            return _names(child)
    return []


def _single_return(function, returns, source):
    found = returns.get(function.id, ())
    if len(found) != 1:
        return None
    values = [v for v in found[0].named_children if v.type != "comment"]
    if len(values) == 1 and values[0].type == "expression_list":
        values = [v for v in values[0].named_children if v.type != "comment"]
    return text(values[0], source) if len(values) == 1 else None


class Resolver:
    def __init__(self, paths, read):
        self.modules = {}  # module path -> its directory
        self.packages = defaultdict(list)  # directory -> non-test .go files
        self.tests = defaultdict(list)  # directory -> _test.go files
        for path in sorted(paths):
            if path.endswith(".go"):
                (self.tests if path.endswith("_test.go") else self.packages)[posixpath.dirname(path)].append(path)
            elif posixpath.basename(path) == "go.mod":
                try:
                    module = _MODULE.search(read(path))
                except (OSError, UnicodeDecodeError):
                    continue
                if module:
                    self.modules[module.group(1)] = posixpath.dirname(path)

    def resolve(self, src, spec):
        directory = self._package(src, spec)
        if directory is None:
            return []
        files = self.packages.get(directory, [])
        if src.endswith("_test.go") and posixpath.dirname(src) == directory:
            files = files + self.tests.get(directory, [])
        return files

    def _package(self, src, spec):
        prefix = spec
        while prefix:
            if prefix in self.modules:
                return posixpath.join(self.modules[prefix], spec[len(prefix) + 1 :]).rstrip("/")
            prefix = prefix.rpartition("/")[0]
        directory = posixpath.dirname(src)
        while True:
            vendored = posixpath.join(directory, "vendor", spec)
            if vendored in self.packages:
                return vendored
            if not directory:
                return None
            directory = posixpath.dirname(directory)
