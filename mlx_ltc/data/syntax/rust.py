"""Rust: `mod` / `use` / `extern crate` imports resolved through each crate's module tree; items and their members.

Import specs (strings):
    "mod a::b::name"             `mod name;` inside inline blocks `mod a { mod b { .. } }` (empty prefix at top level)
    "mod a::name = dir/x.rs"     the same under `#[path = "dir/x.rs"]`
    "use crate::x::Y"            one per leaf of a use tree (aliases, globs and `self` in lists dropped). `self::` and
                                 `super::` already count the inline blocks around the declaration, so they are relative
                                 to the file's module; `::name::..` names a crate; anything else is a bare path
    "use name::x in a::b"        a bare path used inside inline blocks a::b

Crates come from Cargo.toml files ([package] name, [lib] path, [[bin]]/[[test]]/.. paths, renamed dependencies) plus
Cargo's auto-discovered targets, or from bare <dir>/src/lib.rs and src/main.rs without a manifest. Each crate's module
tree follows its `mod` declarations with rustc's file rules; files no declaration reaches (say, inside cfg_if!) get the
module path of their location. A use path resolves to the deepest module file it names (re-exports are not followed).

Definitions: top-level items with their `///` doc comments and attributes; depth 1: the fns of impl and trait blocks
("method") and the items of inline mod blocks. An impl is named "impl Type" or "impl Trait for Type". `returns`: the
only `return` expression of a fn without a tail expression, or the tail of a fn without `return` (a closure's or async
block's returns are its own).
"""

import posixpath
import re
from functools import cache

import tree_sitter as ts
import tree_sitter_rust

from mlx_ltc.data.syntax import Definition
from mlx_ltc.data.syntax._nodes import keyword_nodes, owner_returns

LANGUAGES = {"rust": (".rs",)}

_KINDS = {
    "function_item": "function",
    "struct_item": "struct",
    "enum_item": "enum",
    "union_item": "union",
    "trait_item": "trait",
    "impl_item": "impl",
    "type_item": "type",
    "const_item": "const",
    "static_item": "static",
    "macro_definition": "macro",
    "mod_item": "mod",
}
_METHODS = ("function_item", "function_signature_item")
_FUNCTION_SCOPES = ("function_item", "closure_expression", "async_block")
_STATEMENTS = ("let_declaration", "empty_statement", "line_comment", "block_comment", "attribute_item")
_VALUED_STATEMENTS = ("if_expression", "match_expression", "block", "unsafe_block", "loop_expression")
# No leading \b: it costs re its literal search (10x slower); a match inside an identifier finds no keyword node.
_IMPORT_KEYWORDS = tuple(re.compile(k + rb"\b") for k in (b"use", b"mod", b"extern"))
_IMPORTS = ("use_declaration", "mod_item", "extern_crate_declaration")
_RETURN = re.compile(rb"return\b")
_MOD_DECLARATION = re.compile(rb"mod\s+(?:r#)?[A-Za-z_]\w*\s*;")


@cache
def grammar(language="rust"):
    return ts.Language(tree_sitter_rust.language())


def _text(source, node):
    if node is None:
        return ""
    return source[node.start_byte : node.end_byte].decode("utf-8", "replace")


def _name(source, node):
    return _text(source, node).removeprefix("r#")


# ---------------------------------------------------------------- imports


def imports(root, source, language="rust"):
    specs = {}
    keywords = [n for k in _IMPORT_KEYWORDS for n in keyword_nodes(root, source, k, ("use", "mod", "extern"))]
    for keyword in sorted(keywords, key=lambda n: n.start_byte):
        node = keyword.parent
        if node is None or node.type not in _IMPORTS:
            continue
        scope, in_block = _scope(node, source)
        if node.type == "mod_item":
            if node.child_by_field_name("body") is None and not in_block:
                spec = "mod " + "::".join([*scope, _name(source, node.child_by_field_name("name"))])
                path = _path_attribute(node, source)
                specs[f"{spec} = {path}" if path else spec] = None
        elif node.type == "extern_crate_declaration":
            specs["use ::" + _name(source, node.child_by_field_name("name"))] = None
        else:
            for segments in _use_paths(node.child_by_field_name("argument"), source):
                if segments:
                    specs[_use_spec(segments, scope)] = None
    return list(specs)


def _scope(node, source):
    """Names of the inline `mod` blocks around a node, outermost first, and whether it sits in a function body."""
    scope, in_block = [], False
    node = node.parent
    while node is not None:
        if node.type == "mod_item":
            scope.append(_name(source, node.child_by_field_name("name")))
        elif node.type == "block":
            in_block = True
        node = node.parent
    return scope[::-1], in_block


def _path_attribute(node, source):
    node = node.prev_named_sibling
    while node is not None and node.type in ("attribute_item", "line_comment", "block_comment"):
        attribute = node.named_child(0) if node.type == "attribute_item" else None
        if attribute is not None and _text(source, attribute.named_child(0)) == "path":
            value = attribute.child_by_field_name("value")
            if value is not None and value.type == "string_literal":
                return _text(source, value)[1:-1]
        node = node.prev_named_sibling
    return None


def _use_paths(node, source, prefix=()):
    """Every path a use tree names, as lists of segments: `a::{b, c::d, self}` -> a::b, a::c::d, a."""
    if node is None:
        return
    kind = node.type
    if kind == "use_list":
        for child in node.named_children:
            if child.type == "self":
                yield list(prefix)
            elif child.type not in ("line_comment", "block_comment"):
                yield from _use_paths(child, source, prefix)
    elif kind == "scoped_use_list":
        path = node.child_by_field_name("path")
        if path is not None:
            inner = [*prefix, *_segments(source, path)]
        else:  # `use ::{a, b}` names crates, `use {a, b}` does not
            inner = [*prefix, ""] if node.children[0].type == "::" else list(prefix)
        yield from _use_paths(node.child_by_field_name("list"), source, inner)
    elif kind == "use_as_clause":
        yield from _use_paths(node.child_by_field_name("path"), source, prefix)
    elif kind == "use_wildcard":
        path = node.named_children[0] if node.named_child_count else None
        yield [*prefix, *_segments(source, path)] if path is not None else list(prefix)
    else:
        segments = [*prefix, *_segments(source, node)]
        yield segments[:-1] if len(segments) > 1 and segments[-1] == "self" else segments


def _segments(source, node):
    return "".join(_text(source, node).split()).replace("r#", "").split("::")


def _use_spec(segments, scope):
    head = segments[0]
    if head == "$crate":
        return "use " + "::".join(["crate", *segments[1:]])
    if head == "self":
        return "use " + "::".join(["self", *scope, *segments[1:]])
    if head == "super":
        ups = 0
        while ups < len(segments) and segments[ups] == "super":
            ups += 1
        rest = segments[ups:]
        if ups <= len(scope):
            return "use " + "::".join(["self", *scope[: len(scope) - ups], *rest])
        return "use " + "::".join(["super"] * (ups - len(scope)) + rest)
    path = "use " + "::".join(segments)
    return f"{path} in {'::'.join(scope)}" if scope and head not in ("crate", "") else path


# ---------------------------------------------------------------- definitions


def definitions(root, source, language="rust"):
    out = []
    returns = _ReturnFinder(root)
    for node, start, kind in _items(root, source):
        out.append(_definition(node, start, kind, 0, source, returns))
        body = node.child_by_field_name("body")
        if kind in ("impl", "trait") and body is not None:
            for member, member_start, _ in _items(body, source, _METHODS):
                out.append(_definition(member, member_start, "method", 1, source, returns))
        elif kind == "mod" and body is not None:
            for member, member_start, member_kind in _items(body, source):
                out.append(_definition(member, member_start, member_kind, 1, source, returns))
    return out


def _items(container, source, types=_KINDS):
    """(node, start, kind) of the items among a container's children; start includes doc comments and attributes."""
    lead = None
    for node in container.named_children:
        kind = node.type
        if kind == "attribute_item" or (
            kind in ("line_comment", "block_comment") and node.child_by_field_name("outer")
        ):
            lead = node.start_byte if lead is None else lead
            continue
        if kind in types and (kind != "mod_item" or node.child_by_field_name("body") is not None):
            yield node, node.start_byte if lead is None else lead, _KINDS.get(kind)
        lead = None


def _definition(node, start, kind, depth, source, returns):
    if kind == "impl":  # "impl Circle", "impl Shape for Circle": not the type's own name
        trait = node.child_by_field_name("trait")
        name = " ".join(_text(source, node.child_by_field_name("type")).split())
        name = f"impl {' '.join(_text(source, trait).split())} for {name}" if trait is not None else f"impl {name}"
    else:
        name = _name(source, node.child_by_field_name("name"))
    result = returns.of(node, source) if node.type == "function_item" else None
    return Definition(name, kind, start, node.end_byte, depth, result)


class _ReturnFinder:
    """The value a function returns: its only `return` expression, or else its tail expression."""

    def __init__(self, root):
        self.root = root
        self.by_function = None

    def of(self, function, source):
        if self.by_function is None:
            self.by_function = owner_returns(self.root, source, _RETURN, _FUNCTION_SCOPES, "return_expression")
        found = self.by_function.get(function.id, [])
        body = function.child_by_field_name("body")
        tail = _tail(body) if body is not None else None
        if tail is not None and tail.type == "return_expression":
            tail = None
        if len(found) == 1 and tail is None and found[0].named_child_count:
            value = found[0].named_children[-1]
        elif not found and tail is not None:
            value = tail
        else:
            return None
        return _text(source, value)


def _tail(block):
    """The block's final expression (its value), if it has one."""
    children = [c for c in block.named_children if c.type not in ("line_comment", "block_comment")]
    if not children:
        return None
    last = children[-1]
    if last.type == "expression_statement":
        inner = last.named_children[0] if last.named_child_count else None
        has_semicolon = last.children[-1].type == ";"
        return inner if inner is not None and not has_semicolon and inner.type in _VALUED_STATEMENTS else None
    if last.type in _STATEMENTS or last.type.endswith(("_item", "_declaration", "_definition")):
        return None
    return last


# ---------------------------------------------------------------- resolver


class Resolver:
    """Crates from Cargo.toml files (or bare src/lib.rs, src/main.rs), each crate's module tree from its `mod`s."""

    def __init__(self, paths, read):
        self.paths = set(paths)
        self.read = read
        self.crates = {}  # crate name -> root file of its library
        self.roots = []  # root files, libraries first
        self.path_loaded = set()  # files reached through #[path]: they own their directory like mod.rs
        self.modules = {}  # (root, module path) -> file
        self.places = {}  # file -> [(root, module path)]
        self._find_crates([p for p in self.paths if p.endswith(".rs")], read)
        self._root_set = set(self.roots)
        for root in self.roots:
            self._walk(root)
        self._adopt_orphans()

    def _find_crates(self, sources, read):
        libs, bins, renames = [], [], []
        manifests = sorted(p for p in self.paths if posixpath.basename(p) == "Cargo.toml")
        packages = set()
        for manifest in manifests:
            try:
                package = _cargo(read(manifest))
            except (OSError, UnicodeDecodeError):
                continue
            if not package.get(("package", "name")):
                continue  # a virtual workspace manifest
            top = posixpath.dirname(manifest)
            packages.add(top)
            lib = _join(top, package.get(("lib", "path"), "src/lib.rs"))
            if lib in self.paths:
                libs.append(lib)
                self.crates[(package.get(("lib", "name")) or package[("package", "name")]).replace("-", "_")] = lib
            bins += [_join(top, path) for path in package["bins"]]
            renames += [(alias.replace("-", "_"), real.replace("-", "_")) for alias, real in package["renames"]]
        manifest_dirs = {posixpath.dirname(p) for p in manifests}
        for path in sorted(sources):
            if _target_package(path) in packages:
                bins.append(path)
            top, _, rest = path.rpartition("src/")  # a crate without a manifest: <package>/src/lib.rs
            if rest in ("lib.rs", "main.rs") and (not top or top.endswith("/")) and top[:-1] not in manifest_dirs:
                (libs if rest == "lib.rs" else bins).append(path)
                name = posixpath.basename(top.rstrip("/")).replace("-", "_")
                if rest == "lib.rs" and name:
                    self.crates.setdefault(name, path)
        for alias, real in renames:
            if real in self.crates:
                self.crates.setdefault(alias, self.crates[real])
        self.roots = list(dict.fromkeys(p for p in libs + bins if p in self.paths))

    def _walk(self, root):
        self._place(root, (), root)
        stack = [((), root)]
        while stack:
            module, file = stack.pop()
            for spec in self._mod_specs(file):
                target = self.resolve(file, spec)
                if not target:
                    continue
                inner, _, name = spec[4:].partition(" = ")[0].rpartition("::")
                scope = tuple(inner.split("::")) if inner else ()
                for i in range(1, len(scope) + 1):
                    self.modules.setdefault((root, module + scope[:i]), file)
                path = module + scope + (name,)
                if " = " in spec:
                    self.path_loaded.add(target[0])
                if (root, path) not in self.modules:
                    self._place(root, path, target[0])
                    stack.append((path, target[0]))

    def _place(self, root, module, file):
        self.modules[(root, module)] = file
        self.places.setdefault(file, []).append((root, module))

    def _mod_specs(self, file):
        try:
            source = self.read(file).encode()
        except (OSError, UnicodeDecodeError):
            return []
        if not _MOD_DECLARATION.search(source):
            return []
        root = _parser().parse(source).root_node
        return [spec for spec in imports(root, source) if spec.startswith("mod ")]

    def _adopt_orphans(self):
        """Files no `mod` reaches (e.g. declared inside macros such as cfg_if!) get their conventional module path."""
        homes = {}
        for root in self.roots:
            if posixpath.basename(root) in ("lib.rs", "main.rs"):
                homes.setdefault(posixpath.dirname(root), root)
        for file in sorted(self.paths):
            if not file.endswith(".rs") or file in self.places:
                continue
            directory = posixpath.dirname(file)
            while True:
                if directory in homes:
                    root = homes[directory]
                    rest = file[len(directory) + 1 if directory else 0 : -3].split("/")
                    module = tuple(rest[:-1] if rest[-1] == "mod" else rest)
                    if module and module[0] != "bin" and (root, module) not in self.modules:
                        self._place(root, module, file)
                    break
                if not directory:
                    break
                directory = posixpath.dirname(directory)

    def _owns_directory(self, file):
        return file.endswith("/mod.rs") or file == "mod.rs" or file in self._root_set or file in self.path_loaded

    def resolve(self, src, spec):
        if spec.startswith("mod "):
            target = self._mod_file(src, spec[4:])
            return [target] if target else []
        path, _, scope = spec[4:].partition(" in ")
        segments = path.split("::")
        scope = tuple(scope.split("::")) if scope else ()
        found = {}
        for root, module in self.places.get(src, ()):
            file = self._use_file(root, module, segments, scope)
            if file:
                found[file] = None
        return list(found)

    def _mod_file(self, src, spec):
        declared, _, attribute = spec.partition(" = ")
        *scope, name = declared.split("::")
        directory = posixpath.dirname(src)
        if not self._owns_directory(src) and (scope or not attribute):
            directory = posixpath.join(directory, posixpath.basename(src)[:-3])
        directory = posixpath.join(directory, *scope)
        if attribute:
            target = _join(directory, attribute)
            return target if target in self.paths else None
        base = posixpath.join(directory, name)
        for candidate in (base + ".rs", base + "/mod.rs"):
            if candidate in self.paths:
                return candidate
        return None

    def _use_file(self, root, module, segments, scope):
        head, rest = segments[0], segments[1:]
        if head == "crate":
            base = ()
        elif head == "self":
            base = module
        elif head == "super":
            ups = 1
            while ups < len(segments) and segments[ups] == "super":
                ups += 1
            if ups > len(module):
                return None
            base, rest = module[: len(module) - ups], segments[ups:]
        elif head == "":
            root, base = self.crates.get(rest[0] if rest else "", None), ()
            rest = rest[1:]
        elif (root, module + scope + (head,)) in self.modules:
            base, rest = module + scope, segments
        elif head in self.crates:
            root, base = self.crates[head], ()
        elif (root, (head,)) in self.modules:  # 2015 edition: paths in `use` start at the crate root
            base, rest = (), segments
        else:
            return None
        file = self.modules.get((root, base))
        for segment in rest:  # the deepest module named; inline blocks in between need not be known
            base = (*base, segment)
            file = self.modules.get((root, base), file)
        return file


@cache
def _parser():
    return ts.Parser(grammar())


def _join(directory, path):
    joined = posixpath.normpath(posixpath.join(directory, path))
    return joined if joined != "." and not joined.startswith("../") else ""


def _target_package(path):
    """The package directory a file would be an auto-discovered target of (src/main.rs, src/bin/x.rs,
    src/bin/x/main.rs, tests/x.rs, examples/, benches/, build.rs), else None."""
    directory, name = posixpath.split(path)
    if name == "build.rs":
        return directory
    owners = (directory, posixpath.dirname(directory)) if name == "main.rs" else (directory,)
    for owner in owners:
        for folder in ("src/bin", "tests", "examples", "benches"):
            if owner == folder or owner.endswith("/" + folder):
                return owner[: -len(folder)].rstrip("/")
    if name == "main.rs" and (directory == "src" or directory.endswith("/src")):
        return directory[:-3].rstrip("/")
    return None


_ASSIGNMENT = re.compile(r"""^\s*([\w-]+)\s*=\s*["']([^"']*)["']""")
_RENAME = re.compile(r"""^\s*([\w-]+)\s*=\s*\{[^}]*\bpackage\s*=\s*["']([^"']+)["']""")


def _cargo(text):
    """The few Cargo.toml keys the resolver needs: (section, key) -> value, "bins", "renames"."""
    found, bins, renames = {}, [], []
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[] ")
            continue
        rename = _RENAME.match(line)
        if rename and section.endswith("dependencies"):
            renames.append(rename.groups())
            continue
        match = _ASSIGNMENT.match(line)
        if not match:
            continue
        key, value = match.groups()
        if section in ("bin", "test", "example", "bench") and key == "path":
            bins.append(value)
        elif section in ("package", "lib") and key in ("name", "path"):
            found[(section, key)] = value
    found["bins"], found["renames"] = bins, renames
    return found
