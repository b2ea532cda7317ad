"""The repo's import graph: import depth, strongly connected components and a dependency-first order.

Files skipped for training (generated, too large, duplicates, ...) stay nodes of the graph: an import
of one resolves to it, not to whatever else shares its name (`from pkg import nodes` must not become
an edge to `pkg/__init__.py` because `pkg/nodes.py` is generated). They count for depth, and never
appear in `order`, which lists the files the dataset is made of."""

from dataclasses import dataclass, field

import networkx as nx


@dataclass
class ImportGraph:
    files: list  # the files the dataset is made of, sorted
    edges: list  # [src, dst]: src imports dst (dst may be a skipped file)
    skipped: list = field(default_factory=list)  # nodes that are not dataset files, sorted
    depth: dict = field(default_factory=dict)  # path -> longest import chain below it (0: imports no repo file)
    components: list = field(default_factory=list)  # strongly connected components with > 1 file, sorted
    order: list = field(default_factory=list)  # dataset files, dependencies before dependents

    @classmethod
    def build(cls, files, edges, skipped=()) -> "ImportGraph":
        files = sorted(files)
        skipped = sorted(set(skipped) - set(files))
        g = nx.DiGraph()
        g.add_nodes_from(files + skipped)
        g.add_edges_from((s, d) for s, d in edges if s in g and d in g)
        # condensation: one node per strongly connected component, so cycles are handled as units
        dag = nx.condensation(g)
        members = {c: sorted(dag.nodes[c]["members"]) for c in dag}
        depth = {}
        for c in reversed(list(nx.topological_sort(dag))):  # dependencies (successors) first
            depth[c] = max((depth[s] + 1 for s in dag.successors(c)), default=0)
        graph = cls(files, sorted([s, d] for s, d in g.edges), skipped)
        graph.depth = {p: depth[c] for c in dag for p in members[c]}
        graph.components = sorted(m for m in members.values() if len(m) > 1)
        kept = set(files)
        graph.order = [p for p in _dependency_first(dag, members) if p in kept]
        return graph

    @property
    def in_degree(self) -> dict:
        counts = dict.fromkeys(self.files + self.skipped, 0)
        for _, d in self.edges:
            counts[d] += 1
        return counts

    @property
    def mean_depth(self) -> float:
        return sum(self.depth[p] for p in self.files) / len(self.files) if self.files else 0.0

    def dependencies(self, path: str) -> list:
        """Dataset files `path` depends on, nearest first (direct imports, then theirs, ...), each once;
        within one distance in dependency order."""
        position = {p: i for i, p in enumerate(self.order)}
        imports = {}
        for s, d in self.edges:
            imports.setdefault(s, []).append(d)
        seen, frontier, found = {path}, [path], []
        while frontier:
            step = sorted({d for s in frontier for d in imports.get(s, ()) if d not in seen})
            seen.update(step)
            found += sorted((p for p in step if p in position), key=position.get)
            frontier = step
        return found


def _dependency_first(dag, members) -> list:
    """Depth-first post-order from each component in path order: a file's dependencies are emitted
    right before it, which keeps related files together. Within a cycle, files are in path order —
    the deterministic way to break it."""
    first = {c: members[c][0] for c in dag}
    order, done = [], set()
    for root in sorted(dag, key=first.get):
        stack = [(root, iter(sorted(dag.successors(root), key=first.get)))]
        if root in done:
            continue
        done.add(root)
        while stack:
            node, children = stack[-1]
            child = next((c for c in children if c not in done), None)
            if child is None:
                stack.pop()
                order += members[node]
            else:
                done.add(child)
                stack.append((child, iter(sorted(dag.successors(child), key=first.get))))
    return order
