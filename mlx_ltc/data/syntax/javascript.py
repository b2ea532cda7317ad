"""JavaScript and TypeScript: imports, top-level declarations and class members, and specifier resolution.

Import specs are the module specifiers as written ("./x", "../lib/index.js", "@scope/pkg/sub", "react"),
from `import`, `export ... from`, `require(...)`, `import(...)` and TS `import x = require(...)`.
"""

import json
import posixpath
import re
from functools import cache

import tree_sitter
import tree_sitter_javascript
import tree_sitter_typescript

from mlx_ltc.data.syntax import Definition
from mlx_ltc.data.syntax._nodes import keyword_nodes, owner_returns, single_return, text, with_leading_comments

LANGUAGES = {
    "javascript": (".js", ".jsx", ".mjs", ".cjs"),
    "typescript": (".ts", ".mts", ".cts", ".d.ts"),
    "tsx": (".tsx",),
}


@cache
def grammar(language):
    if language == "typescript":
        return tree_sitter.Language(tree_sitter_typescript.language_typescript())
    if language == "tsx":
        return tree_sitter.Language(tree_sitter_typescript.language_tsx())
    return tree_sitter.Language(tree_sitter_javascript.language())


def string_value(node, source):
    """A string literal's value, or None for anything computed."""
    if node is None or node.type not in ("string", "template_string"):
        return None
    if any(c.type == "template_substitution" for c in node.children):
        return None
    return text(node, source)[1:-1]


def first_argument(call, source):
    args = call.child_by_field_name("arguments")
    return string_value(args.named_children[0], source) if args is not None and args.named_children else None


_IMPORT_WORDS = re.compile(rb"\b(?:import|export|require)\b")


def import_source(token, source):
    """The specifier an `import` / `export` / `require` token introduces, if any."""
    parent = token.parent
    if parent is None:
        return None
    kind = parent.type
    if kind in ("import_statement", "export_statement"):
        found = parent.child_by_field_name("source")
        if found is None:  # TS `import x = require("./x")`
            clause = next((c for c in parent.named_children if c.type == "import_require_clause"), None)
            found = clause and clause.child_by_field_name("source")
        return string_value(found, source)
    if kind == "import":  # dynamic import(): the keyword sits in an `import` node, the callee
        call = parent.parent
        return first_argument(call, source) if call is not None and call.type == "call_expression" else None
    if kind == "call_expression" and token.type == "identifier" and parent.child_by_field_name("function") == token:
        return first_argument(parent, source)  # require("./x")
    return None


def imports(root, source, language) -> list:
    specs = []
    for token in keyword_nodes(root, source, _IMPORT_WORDS, ("import", "export", "identifier")):
        if token.type == "identifier" and text(token, source) != "require":
            continue
        spec = import_source(token, source)
        if spec:
            specs.append(spec)
    return specs


_DECLARATIONS = {
    "function_declaration": "function",
    "generator_function_declaration": "function",
    "function_signature": "function",
    "function_expression": "function",  # export default function () {}
    "class_declaration": "class",
    "abstract_class_declaration": "class",
    "class": "class",  # export default class {}
    "interface_declaration": "interface",
    "type_alias_declaration": "type",
    "enum_declaration": "enum",
    "internal_module": "namespace",
    "module": "namespace",
}
_FUNCTIONS = ("function_declaration", "generator_function_declaration", "function_expression", "function")
_FUNCTIONS += ("generator_function", "arrow_function", "method_definition")
_FUNCTION_VALUES = ("arrow_function", "function_expression", "function", "generator_function")
_VALUES = dict.fromkeys(_FUNCTION_VALUES, "function") | {"class": "class"}  # const X = ...
_MEMBERS = ("method_definition", "method_signature", "abstract_method_signature")
_RETURN = re.compile(rb"\breturn\b")


def declared(node, source):
    """(name, kind, declaration node) for each thing a top-level statement declares."""
    if node.type == "export_statement":
        inner = node.child_by_field_name("declaration") or node.child_by_field_name("value")
        return [] if inner is None else declared(inner, source)
    if node.type in ("ambient_declaration", "expression_statement"):  # declare ..., namespace N {}
        return [d for c in node.named_children for d in declared(c, source)]
    if node.type in ("lexical_declaration", "variable_declaration"):
        out = []
        for declarator in node.named_children:
            value = declarator.child_by_field_name("value")
            name = declarator.child_by_field_name("name")
            if value is not None and value.type in _VALUES and name is not None:
                out.append((text(name, source), _VALUES[value.type], value))
        return out
    kind = _DECLARATIONS.get(node.type)
    if kind is None:
        return []
    name = node.child_by_field_name("name")
    return [(text(name, source) if name is not None else "default", kind, node)]


def returned(function, returns, source):
    if function.type == "arrow_function":
        body = function.child_by_field_name("body")
        if body is not None and body.type != "statement_block":
            return text(body, source)
    return single_return(function, returns, source)


def definitions(root, source, language) -> list:
    returns = owner_returns(root, source, _RETURN, _FUNCTIONS)
    found = []
    for node, start in with_leading_comments(root.children, -1):
        for name, kind, inner in declared(node, source):
            value = returned(inner, returns, source) if kind == "function" else None
            found.append(Definition(name, kind, start, node.end_byte, 0, value))
            if kind == "class":
                found.extend(members(inner, returns, source))
    return found


def members(cls, returns, source):
    body = cls.child_by_field_name("body")
    if body is None:
        return
    for member, start in with_leading_comments(body.children, body.start_point.row):
        name = member.child_by_field_name("name") or member.child_by_field_name("property")
        if name is None:
            continue
        value = member.child_by_field_name("value")
        if member.type in _MEMBERS:
            function = member
        elif value is not None and value.type in _FUNCTION_VALUES:
            function = value  # handler = () => {...}
        else:
            continue
        yield Definition(text(name, source), "method", start, member.end_byte, 1, returned(function, returns, source))


_JS = (".js", ".jsx", ".mjs", ".cjs")
_TS = (".ts", ".tsx", ".d.ts", ".mts", ".cts")
_FROM_JS = {".js": (".ts", ".tsx", ".d.ts"), ".jsx": (".tsx",), ".mjs": (".mts",), ".cjs": (".cts",)}
_BUILT = re.compile(r"^(?:\./)?(?:dist|build|out|lib|esm|cjs)/(.*?)(?:\.d\.ts|\.[mc]?js)?$")


def loose_json(raw: str):
    """tsconfig.json allows comments and trailing commas."""
    raw = re.sub(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/', lambda m: m.group(1) or "", raw, flags=re.S)
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", raw))


def matches(mapping, spec):
    """(target, wildcard text) for the keys of a tsconfig `paths` or package.json `exports` / `imports` map
    that match a specifier, the longest prefix first (as tsc and Node do)."""
    for key in sorted(mapping, key=lambda k: -len(k.partition("*")[0])):
        prefix, star, suffix = key.partition("*")
        if not star:
            if spec == key:
                yield mapping[key], ""
        elif spec.startswith(prefix) and spec.endswith(suffix) and len(spec) >= len(prefix) + len(suffix):
            yield mapping[key], spec[len(prefix) : len(spec) - len(suffix)]


def targets(value):
    """The paths of a map entry: a string, a list of fallbacks, or nested conditions (import, types, ...)."""
    if isinstance(value, str):
        return [value]
    values = value if isinstance(value, list) else value.values() if isinstance(value, dict) else ()
    return [t for v in values for t in targets(v)]


def _dirname(path):
    return path.rpartition("/")[0]


def _join(*parts):
    joined = posixpath.normpath(posixpath.join(*parts))
    return "" if joined == "." else joined


class Resolver:
    def __init__(self, paths, read):
        self.files = set(paths)
        self.read = read
        self.manifests = {}  # directory -> package.json
        self.packages = {}  # package name -> directory
        self.configs = {}  # directory -> (baseUrl or None, paths map, the directory paths are relative to)
        for path in paths:
            name = path.rpartition("/")[2]
            if "node_modules/" in path or name not in ("package.json", "tsconfig.json", "jsconfig.json"):
                continue
            if name == "package.json":
                manifest = self._load(path)
                if isinstance(manifest, dict):
                    self.manifests[_dirname(path)] = manifest
                    if isinstance(manifest.get("name"), str):
                        self.packages.setdefault(manifest["name"], _dirname(path))
            else:
                config = self._compiler_paths(path)
                if config[0] is not None or config[1]:
                    self.configs.setdefault(_dirname(path), config)
        self._nearest = {}

    def _load(self, path):
        try:
            return loose_json(self.read(path))
        except (OSError, ValueError):
            return None

    def _compiler_paths(self, path, depth=0):
        """(baseUrl, paths, directory the paths are relative to) of a tsconfig, following relative `extends`."""
        config = self._load(path)
        config = config if isinstance(config, dict) else {}
        here = _dirname(path)
        base, patterns, patterns_dir = None, {}, here
        parent = config.get("extends")
        if isinstance(parent, str) and parent.startswith(".") and depth < 4:
            parent = _join(here, parent)
            parent = parent if parent.endswith(".json") else parent + ".json"
            if parent in self.files:
                base, patterns, patterns_dir = self._compiler_paths(parent, depth + 1)
        options = config.get("compilerOptions") or {}
        if isinstance(options.get("baseUrl"), str):
            base = _join(here, options["baseUrl"])
        if isinstance(options.get("paths"), dict):
            patterns, patterns_dir = options["paths"], here
        return base, patterns, patterns_dir if base is None else base

    def _nearest_of(self, table, directory):
        """The entry of `table` (keyed by directory) nearest above a directory."""
        key = (id(table), directory)
        if key not in self._nearest:
            found = table.get(directory)
            if found is None and directory:
                found = self._nearest_of(table, _dirname(directory))
            self._nearest[key] = found
        return self._nearest[key]

    def probe(self, base, src):
        """The file a specifier path names: itself, with an extension, TS source for a .js path, or an index."""
        if base in self.files:
            return base
        order = _TS + _JS if src.endswith(_TS) else _JS + _TS
        stem, ext = posixpath.splitext(base)
        for candidate in [stem + e for e in _FROM_JS.get(ext, ())] + [base + e for e in order]:
            if candidate in self.files:
                return candidate
        for e in order:
            index = posixpath.join(base, "index" + e)
            if index in self.files:
                return index
        return None

    def _entry(self, directory, entry, src):
        """A package's file, or for a build output that isn't committed (dist/x.js) the source it comes from."""
        hit = self.probe(_join(directory, entry), src)
        built = None if hit else _BUILT.match(entry)
        return hit or (built and self.probe(_join(directory, "src", built.group(1)), src))

    def _mapped(self, directory, mapping, spec, src):
        for target, star in matches(mapping, spec):
            for path in targets(target):
                hit = self._entry(directory, path.replace("*", star), src)
                if hit:
                    return hit
        return None

    def _aliased(self, src, spec):
        config = self._nearest_of(self.configs, _dirname(src))
        if config is None:
            return None
        base, patterns, patterns_dir = config
        hit = self._mapped(patterns_dir, patterns, spec, src)
        return hit or (self.probe(_join(base, spec), src) if base is not None else None)

    def _subpath_import(self, src, spec):
        """Node's `#name` imports, mapped by the package.json around the importing file."""
        directory = _dirname(src)
        while True:
            manifest = self.manifests.get(directory)
            if manifest is not None and isinstance(manifest.get("imports"), dict):
                return self._mapped(directory, manifest["imports"], spec, src)
            if not directory:
                return None
            directory = _dirname(directory)

    def _package(self, src, spec):
        parts = spec.split("/")
        cut = 2 if spec.startswith("@") else 1
        directory = self.packages.get("/".join(parts[:cut]))
        if directory is None:
            return None
        manifest = self.manifests[directory]
        rest = "/".join(parts[cut:])
        exports = manifest.get("exports")
        if exports is not None:
            if not (isinstance(exports, dict) and any(k.startswith(".") for k in exports)):
                exports = {".": exports}  # the main entry alone, maybe by condition
            hit = self._mapped(directory, exports, f"./{rest}" if rest else ".", src)
            if hit:
                return hit
        if rest:
            return self._entry(directory, rest, src) or self.probe(_join(directory, "src", rest), src)
        for field in ("source", "types", "typings", "module", "main"):
            entry = manifest.get(field)
            hit = isinstance(entry, str) and self._entry(directory, entry, src)
            if hit:
                return hit
        return self.probe(_join(directory, "index"), src) or self.probe(_join(directory, "src", "index"), src)

    def resolve(self, src, spec) -> list:
        spec = spec.split("?", 1)[0]
        if spec.startswith("/"):
            return []
        if spec.startswith("."):
            joined = _join(_dirname(src), spec)
            hit = None if joined == ".." or joined.startswith("../") else self.probe(joined, src)
        else:
            hit = spec.startswith("#") and self._subpath_import(src, spec)
            hit = hit or self._aliased(src, spec) or self._package(src, spec)
        return [hit] if hit else []
