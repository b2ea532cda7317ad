"""C and C++: #include edges through the including file's directory and the repository's include directories;
top-level definitions, namespace members and inline methods.

Import specs: the include's path with its delimiters, as written: '"geo/point.h"' or '<geo/point.h>' (includes
of a macro are skipped). A quoted include resolves against the including file's directory first; then, like an
angle include, against the include directories (every directory named `include`, the root, top-level `src`;
the one sharing the longest prefix with the includer wins); then to the one file whose path ends with it.
Angle includes without a directory (<stdio.h>) skip that last step, so system headers give no edge.

`.h` files are C. When the C grammar stumbles over a header with a line that looks like C++ (a namespace,
template, class or access specifier), the header is parsed again as C++ and the tree with fewer ERROR nodes is
read (Syntax.errors still reports the C parse).

Definitions, with the comment lines directly above, seen through #if/#ifdef blocks and extern "C": functions
(out-of-class ones named "Class::method"), struct/union/enum/class specifiers with a body, typedefs and `using`
aliases, namespaces ("" when anonymous), templates (spanning the `template <..>` line, kind of what they declare) and
#define macros (not include guards). Depth 1: the members of top-level namespaces and the methods defined inside
top-level classes. `returns`: the expression of a function's only return statement (lambdas' returns are their own).
"""

import posixpath
import re
from collections import defaultdict
from functools import cache

import tree_sitter as ts
import tree_sitter_c
import tree_sitter_cpp

from mlx_ltc.data.syntax import Definition
from mlx_ltc.data.syntax._nodes import keyword_nodes, owner_returns, single_return, text, with_leading_comments

LANGUAGES = {"c": (".c", ".h"), "cpp": (".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".ipp", ".inl")}

_INCLUDE = re.compile(rb"#[ \t]*include\b")
_RETURN = re.compile(rb"return\b")  # no leading \b: it would cost re its literal search
_CPP_HINT = re.compile(
    rb"^[ \t]*(?:namespace\b|template[ \t]*<|class[ \t]+\w+[^;(]*$|(?:public|private|protected)[ \t]*:)", re.M
)
_FUNCTIONS = ("function_definition", "lambda_expression")
_TRANSPARENT = ("preproc_if", "preproc_ifdef", "preproc_else", "preproc_elif", "preproc_elifdef")
_RECORDS = {
    "struct_specifier": "struct",
    "union_specifier": "union",
    "enum_specifier": "enum",
    "class_specifier": "class",
}
_NAMES = ("identifier", "field_identifier", "type_identifier", "qualified_identifier", "operator_name")
_NAMES += ("destructor_name", "template_function", "primitive_type")


@cache
def grammar(language="c"):
    return ts.Language((tree_sitter_c if language == "c" else tree_sitter_cpp).language())


@cache
def _errors_query(language):
    return ts.Query(grammar(language), "(ERROR) @error")


def _errors(root, language):
    return len(ts.QueryCursor(_errors_query(language)).captures(root).get("error", ()))


_reparsed = (None, None)  # (source, root): parse() asks imports() and definitions() about the same bytes


def _tree_root(root, source, language):
    """The root to read: a .h that looks like C++ and that C cannot parse is read as C++."""
    global _reparsed
    if language != "c" or not root.has_error:
        return root
    cached_source, cached_root = _reparsed
    if cached_source is not source:
        cached_root = root
        if _CPP_HINT.search(source):
            cpp = _cpp_parser().parse(source).root_node
            cached_root = cpp if _errors(cpp, "cpp") < _errors(root, "c") else root
        _reparsed = (source, cached_root)
    return cached_root


@cache
def _cpp_parser():
    return ts.Parser(grammar("cpp"))


def imports(root, source, language="c"):
    root = _tree_root(root, source, language)
    specs = []
    for node in keyword_nodes(root, source, _INCLUDE, ("#include",)):
        path = node.parent.child_by_field_name("path") if node.parent is not None else None
        if path is not None and path.type in ("string_literal", "system_lib_string"):
            specs.append(text(path, source).strip())
    return specs


def definitions(root, source, language="c"):
    root = _tree_root(root, source, language)
    returns = owner_returns(root, source, _RETURN, _FUNCTIONS) if _RETURN.search(source) else {}
    out = []
    _collect(root, 0, source, returns, out)
    return out


def _collect(container, depth, source, returns, out):
    """Definitions among a container's children; preprocessor conditionals and extern "C" blocks are see-through."""
    row = container.start_point.row - 1 if container.type == "translation_unit" else container.start_point.row
    for node, start in with_leading_comments(container.named_children, row):
        if node.type in _TRANSPARENT:
            _collect(node, depth, source, returns, out)
            continue
        body = node.child_by_field_name("body") if node.type == "linkage_specification" else None
        if body is not None and body.type == "declaration_list":
            _collect(body, depth, source, returns, out)
            continue
        found = _definition(node, container, source)
        if found is None:
            continue
        name, kind, inner, end = found
        result = single_return(inner, returns, source) if inner.type == "function_definition" else None
        out.append(Definition(name, kind, start, end, depth, result))
        if depth == 0 and kind == "namespace" and inner.child_by_field_name("body") is not None:
            _collect(inner.child_by_field_name("body"), 1, source, returns, out)
        elif depth == 0 and kind in ("class", "struct", "union") and inner.child_by_field_name("body") is not None:
            _methods(inner.child_by_field_name("body"), source, returns, out)


def _methods(body, source, returns, out):
    """Methods defined inline in a class body (depth 1)."""
    for node, start in with_leading_comments(body.named_children, body.start_point.row):
        if node.type in _TRANSPARENT:
            _methods(node, source, returns, out)
            continue
        function = _unwrap(node)
        if function.type == "function_definition":
            name = _declarator_name(function.child_by_field_name("declarator"), source)
            out.append(Definition(name, "method", start, node.end_byte, 1, single_return(function, returns, source)))


def _definition(node, container, source):
    """(name, kind, inner node, end) when a node defines something, else None."""
    end = node.end_byte
    if node.type in ("preproc_def", "preproc_function_def"):
        name = text(node.child_by_field_name("name"), source)
        guard = container.type == "preproc_ifdef" and text(container.child_by_field_name("name"), source) == name
        if guard and node.child_by_field_name("value") is None:
            return None
        while end > node.start_byte and source[end - 1] in b" \t\r\n":
            end -= 1
        return name, "macro", node, end
    inner = _unwrap(node)
    kind = inner.type
    if kind == "function_definition":
        return _declarator_name(inner.child_by_field_name("declarator"), source), "function", inner, end
    if kind == "namespace_definition":
        name = inner.child_by_field_name("name")
        return ("".join(text(name, source).split()) if name else ""), "namespace", inner, end
    if kind in ("type_definition", "alias_declaration"):
        field = "declarator" if kind == "type_definition" else "name"
        return _declarator_name(inner.child_by_field_name(field), source), "typedef", inner, end
    record = _record(inner)
    if record is None or record.child_by_field_name("body") is None:
        return None
    name = record.child_by_field_name("name")
    name = text(name, source) if name is not None else _declarator_name(inner.child_by_field_name("declarator"), source)
    after = node.next_sibling
    if inner is record and after is not None and after.type == ";":  # `struct s { .. };`: the grammar leaves `;` out
        end = after.end_byte
    return name, _RECORDS[record.type], record, end


def _unwrap(node):
    """The definition inside `template <..>` and `extern "C"` wrappers."""
    while node.type in ("template_declaration", "linkage_specification"):
        if node.type == "linkage_specification":
            inner = node.child_by_field_name("body")
        else:
            inner = next((c for c in reversed(node.named_children) if c.type not in ("comment",)), None)
            inner = inner if inner is not None and inner.type != "template_parameter_list" else None
        if inner is None:
            break
        node = inner
    return node


def _record(node):
    """The struct/union/enum/class specifier a node defines (itself, or the type of a declaration)."""
    if node.type in _RECORDS:
        return node
    if node.type == "declaration":
        kind = node.child_by_field_name("type")
        return kind if kind is not None and kind.type in _RECORDS else None
    return None


def _declarator_name(node, source):
    while node is not None and node.type not in _NAMES:
        inner = node.child_by_field_name("declarator")
        if inner is None:
            inner = next((c for c in node.named_children if c.type in _NAMES or c.type.endswith("declarator")), None)
        node = inner
    return "".join(text(node, source).split()) if node is not None else ""


class Resolver:
    def __init__(self, paths, read):
        self.paths = set(paths)
        directories = set()
        self.by_name = defaultdict(list)
        for path in sorted(self.paths):
            self.by_name[posixpath.basename(path)].append(path)
            directory = posixpath.dirname(path)
            while directory and directory not in directories:
                directories.add(directory)
                directory = posixpath.dirname(directory)
        found = sorted(d for d in directories if posixpath.basename(d) == "include")
        self.include_dirs = found + [""] + (["src"] if "src" in directories else [])

    def resolve(self, src, spec):
        name = spec[1:-1].strip()
        if len(spec) < 3 or not name:
            return []
        quoted = spec[0] == '"'
        here = posixpath.dirname(src)
        if quoted:
            local = _join(here, name)
            if local in self.paths:
                return [local]
        hits = [(d, p) for d in self.include_dirs if (p := _join(d, name)) in self.paths]
        if hits:
            return [max(hits, key=lambda hit: _shared(hit[0], here))[1]]
        if not quoted and "/" not in name:
            return []
        suffix = posixpath.normpath(name)
        while suffix.startswith("../"):
            suffix = suffix[3:]
        matches = [
            p for p in self.by_name.get(posixpath.basename(suffix), ()) if p == suffix or p.endswith("/" + suffix)
        ]
        return matches if len(matches) == 1 else []


def _join(directory, path):
    joined = posixpath.normpath(posixpath.join(directory, path))
    return joined if not joined.startswith("../") else ""


def _shared(a, b):
    """How many leading directories two paths share."""
    count = 0
    for x, y in zip(a.split("/"), b.split("/")):
        if x != y or not x:
            break
        count += 1
    return count
