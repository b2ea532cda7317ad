"""Compare the Python import edges of mlx_ltc.data.syntax with grimp's on installed packages.

    python scripts/compare_imports_grimp.py rich click mlx_lm

The repo is the package's parent directory restricted to the package's files, so repo paths
("rich/console.py") spell the module names grimp uses ("rich.console") and the package directory is
a top-level package of that repo, as it is for a checkout. Only modules grimp knows take part: grimp
skips stubs (.pyi), files with extra dots in their names, directories that are not identifiers and
directories without __init__.py inside the package (test folders of numpy, say).
"""

import argparse
import importlib.util
import time
from pathlib import Path

import grimp

from mlx_ltc.data.syntax import parse, resolve_all, resolver


def package_files(package):
    spec = importlib.util.find_spec(package)
    directory = Path(spec.submodule_search_locations[0])
    parent = directory.parent
    paths = sorted(p.relative_to(parent).as_posix() for p in directory.rglob("*") if p.is_file())
    return parent, [p for p in paths if "__pycache__" not in p]


def module_files(paths):
    """Dotted module name -> file, as grimp names modules."""
    out = {}
    for path in paths:
        if path.endswith(".py"):
            stem = path[:-3]
            if stem.endswith("/__init__"):
                stem = stem[: -len("/__init__")]
            out[stem.replace("/", ".")] = path
    return out


def our_edges(parent, paths, read):
    sources = {p: (parent / p).read_bytes() for p in paths if p.endswith((".py", ".pyi"))}
    parse("warm_up.py", b"")  # grammar and module loading are not parsing
    start = time.perf_counter()
    syntaxes = {p: parse(p, s) for p, s in sources.items()}
    seconds = time.perf_counter() - start
    megabytes = sum(map(len, sources.values())) / 1e6
    start = time.perf_counter()
    edges = resolve_all(syntaxes, paths, read)
    resolve_seconds = time.perf_counter() - start
    return set(edges), syntaxes, megabytes, seconds, resolve_seconds


def grimp_edges(package, files):
    graph = grimp.build_graph(package, cache_dir=None)
    edges, unmapped = set(), 0
    for module in graph.modules:
        if module not in files:
            continue  # namespace packages and squashed externals
        for imported in graph.find_modules_directly_imported_by(module):
            if imported in files:
                if imported != module:
                    edges.add((files[module], files[imported]))
            else:
                unmapped += 1
    return edges, graph, unmapped


def compare(package, show):
    parent, paths = package_files(package)
    files = module_files(paths)

    def read(path):
        return (parent / path).read_text(errors="replace")

    ours, syntaxes, megabytes, seconds, resolve_seconds = our_edges(parent, paths, read)
    theirs, graph, unmapped = grimp_edges(package, files)
    known = {path for module, path in files.items() if module in graph.modules}
    stubs = sum(1 for a, b in ours if a in known and b.endswith(".pyi"))
    ours = {(a, b) for a, b in ours if a in known and b in known}
    both = ours & theirs
    precision = len(both) / len(ours) if ours else 1.0
    recall = len(both) / len(theirs) if theirs else 1.0
    print(f"== {package}: {len(known)} modules, {megabytes:.2f} MB")
    print(f"   parse {megabytes / seconds:.1f} MB/s ({seconds:.2f} s), resolve {resolve_seconds:.2f} s")
    print(f"   edges: ours {len(ours)}, grimp {len(theirs)}, both {len(both)}")
    print(f"   not compared: grimp's to namespace dirs {unmapped}, ours to .pyi stubs (grimp skips them) {stubs}")
    print(f"   precision {precision:.4f}  recall {recall:.4f}")
    ours_resolver = resolver("python", paths, read)
    for src, dst in sorted(ours - theirs)[:show]:
        specs = [s for s in syntaxes[src].imports if dst in ours_resolver.resolve(src, s)]
        print(f"   only ours: {src} -> {dst}   {', '.join(specs)}")
    names = {path: module for module, path in files.items()}
    for src, dst in sorted(theirs - ours)[:show]:
        lines = graph.get_import_details(importer=names[src], imported=names[dst])
        print(
            f"   only grimp: {src} -> {dst}   "
            + "; ".join(f"{d['line_number']}: {d['line_contents']}" for d in lines[:2])
        )
    return precision, recall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="+")
    ap.add_argument("--show", type=int, default=8, help="disagreements to print of each kind")
    args = ap.parse_args()
    for package in args.packages:
        compare(package, args.show)


if __name__ == "__main__":
    main()
