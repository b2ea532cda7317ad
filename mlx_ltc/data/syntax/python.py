"""Python: imports anywhere in a file, top-level definitions and methods, and module resolution.

Import specs: "a.b.c" for `import a.b.c`; "MODULE:NAME" for `from MODULE import NAME`, where MODULE
keeps its leading dots when relative ("..pkg.mod:y", ".:x") and NAME is "*" for a wildcard. One spec
per imported name, so the resolver can tell a submodule (`from pkg import mod`) from an attribute.
"""

import re
from functools import cache

import tree_sitter
import tree_sitter_python

from mlx_ltc.data.syntax import Definition
from mlx_ltc.data.syntax._nodes import keyword_statements, owner_returns, single_return, text, with_leading_comments

LANGUAGES = {"python": (".py", ".pyi")}


@cache
def grammar(language):
    return tree_sitter.Language(tree_sitter_python.language())


def dotted(node, source) -> str:
    if node.type == "aliased_import":
        node = node.child_by_field_name("name")
    return "".join(text(node, source).split())


_IMPORT = re.compile(rb"\bimport\b")
_IMPORT_STATEMENTS = {"import_statement", "import_from_statement"}


def imports(root, source, language) -> list:
    specs = []
    for stmt in keyword_statements(root, source, _IMPORT, "import", _IMPORT_STATEMENTS):
        names = [dotted(n, source) for n in stmt.children_by_field_name("name")]
        if stmt.type == "import_statement":
            specs.extend(names)
            continue
        module = stmt.child_by_field_name("module_name")
        if module is None:
            continue
        if any(c.type == "wildcard_import" for c in stmt.children):
            names.append("*")
        prefix = dotted(module, source)
        specs.extend(f"{prefix}:{name}" for name in names)
    return specs


_RETURN = re.compile(rb"\breturn\b")


def unwrap(node):
    """The function or class definition behind a statement, or None."""
    if node.type == "decorated_definition":
        node = node.child_by_field_name("definition")
    if node is not None and node.type in ("function_definition", "class_definition"):
        return node
    return None


def definitions(root, source, language) -> list:
    returns = owner_returns(root, source, _RETURN, ("function_definition",))
    found = []

    def add(node, start, definition, kind, depth):
        name = definition.child_by_field_name("name")
        value = single_return(definition, returns, source) if definition.type == "function_definition" else None
        if name is not None:
            found.append(Definition(text(name, source), kind, start, node.end_byte, depth, value))

    for node, start in with_leading_comments(root.children, -1):
        definition = unwrap(node)
        if definition is None:
            continue
        if definition.type == "function_definition":
            add(node, start, definition, "function", 0)
            continue
        add(node, start, definition, "class", 0)
        body = definition.child_by_field_name("body")
        if body is None:
            continue
        # Comments above the first member are children of the class, not of its body.
        header = [c for c in definition.children if c.type == "comment" and c.start_byte < body.start_byte]
        colon = next((c for c in definition.children if c.type == ":"), definition)
        for member, member_start in with_leading_comments(header + body.children, colon.start_point.row):
            inner = unwrap(member)
            if inner is not None:
                add(member, member_start, inner, "method" if inner.type == "function_definition" else "class", 1)
    return found


def _module_key(path):
    """The module path of a file without its suffix, `__init__` dropped: "pkg/mod", "pkg", "" (root)."""
    stem = path[: path.rfind(".")]
    if stem == "__init__":
        return ""
    return stem[: -len("/__init__")] if stem.endswith("/__init__") else stem


def _is_init(path):
    return path.rpartition("/")[2] in ("__init__.py", "__init__.pyi")


def _rank(path):
    """Python's own choice when several files are one module: a package before a module, .py before .pyi."""
    return (not _is_init(path), path.endswith(".pyi"))


def _parent(key):
    return key.rpartition("/")[0]


def _join(directory, key):
    return f"{directory}/{key}" if directory else key


class Resolver:
    def __init__(self, paths, read):
        self.files = {}  # module key ("pkg/mod") -> file
        for path in paths:
            if path.endswith((".py", ".pyi")):
                key = _module_key(path)
                if key not in self.files or _rank(path) < _rank(self.files[key]):
                    self.files[key] = path
        self.packages = {key for key, path in self.files.items() if _is_init(path)}
        self.roots = self._source_roots()
        self.absolute = self._absolute_names()
        self._own_roots = {}

    def _source_roots(self):
        """Directories on the import path: the repo root, src/, lib/, and the parent of every top-level package."""
        parents = {_parent(key) for key in self.packages if key and _parent(key) not in self.packages}
        others = sorted(parents - {"", "src", "lib"}, key=lambda d: (d.count("/"), d))
        return ["", "src", "lib", *others]

    def _absolute_names(self):
        """Dotted module name -> file, the earliest root winning. Directories without __init__.py count as
        namespace packages. Beside a package, loose modules (setup.py, a script) are not importable: an install
        of the project puts its packages on the path, not those."""
        rank = {root: i for i, root in enumerate(self.roots)}
        best = {}
        for key, path in self.files.items():
            parts = key.split("/") if key else []
            for i in range(len(parts)):
                root = "/".join(parts[:i])
                if root not in rank or not all(p.isidentifier() for p in parts[i:]):
                    continue
                if rank[root] > 2 and i == len(parts) - 1 and key not in self.packages:
                    continue  # a loose script beside a package
                name = ".".join(parts[i:])
                if name not in best or rank[root] < best[name][0]:
                    best[name] = (rank[root], path)
        return {name: path for name, (_, path) in best.items()}

    def _own_root(self, src):
        """The first sys.path entry for a file: a script's own directory, or for a module of a package the
        directory holding the top-level package."""
        directory = _parent(src)
        if directory not in self._own_roots:
            root = directory
            while root and root in self.packages:
                root = _parent(root)
            self._own_roots[directory] = root
        return self._own_roots[directory]

    def _lookup(self, src, names):
        """The first of some dotted names found in the importing file's own root, else in any root: a package
        found there hides same-named ones elsewhere, attributes and all."""
        own = self._own_root(src)
        for name in names:
            hit = self.files.get(_join(own, name.replace(".", "/")))
            if hit:
                return hit
        return next((self.absolute[name] for name in names if name in self.absolute), None)

    def _relative_key(self, src, module):
        dots = len(module) - len(module.lstrip("."))
        base = _parent(src)
        for _ in range(dots - 1):
            if not base:
                return None  # beyond the top of the repo
            base = _parent(base)
        rest = module[dots:].replace(".", "/")
        return "/".join(p for p in (base, rest) if p)

    def resolve(self, src, spec) -> list:
        module, _, name = spec.partition(":")
        if not name:
            # A missing module is most often a compiled extension; its package still runs (grimp agrees).
            hit = self._lookup(src, [module, module.rpartition(".")[0]] if "." in module else [module])
            return [hit] if hit else []
        if module.startswith("."):
            key = self._relative_key(src, module)
            if key is None:
                return []
            hit = self.files.get(_join(key, name)) if name != "*" else None
            hit = hit or self.files.get(key)
        else:
            hit = self._lookup(src, [f"{module}.{name}", module] if name != "*" else [module])
        return [hit] if hit else []
