"""The focus allocator: greedy, block-aligned changes to a working context within its budget.

Actions (each moves 31 positions of budget): expand an L1 gist to its raw block or an L2 gist to its 32 L1
gists; collapse a raw block to its L1 gist (or, only when the budget forces it, 32 sibling L1 gists to their
L2 gist). Legality: raw blocks can't expand, the top level can't collapse. A block (or L2 group) that changed
can't change again within `cooldown` iterations (hysteresis); at most `n_diff` chosen actions per iteration
(forced collapses, which the budget demands, come on top). The newest `protect` raw blocks don't collapse
(they are what the next tokens continue) unless the budget is too small to keep them.

`utility` is LensNet's signed score per entry: u = (value of the entry's detail) - (the budget's price). The
highest u > tau among gists is expanded while the budget allows; when it doesn't, the lowest-u raw block is
collapsed to pay for it, but only if the swap gains (u_expand - u_collapse > margin).
"""

from dataclasses import dataclass, field

from mlx_ltc.research.megacontext.context import Entry, cost

__all__ = ["Focus", "extend"]


def extend(tree, entries: list) -> list:
    """The entries plus a raw entry for each block completed since they were made (the tail grew)."""
    covered = 0  # blocks the entries cover
    if entries:
        covered = (entries[-1].index + 1) * tree.block ** max(entries[-1].level - 1, 0)
    return [*entries, *(Entry(0, k) for k in range(covered, len(tree.tokens) // tree.block))]


def _key(e: Entry) -> tuple:
    """What a flip of this entry changes: its block (raw <-> L1) or its L2 group (L2 <-> 32 L1)."""
    return (1, e.index) if e.level in (0, 1) else (2, e.index)


@dataclass
class Focus:
    budget: int
    n_diff: int = 4
    tau: float = 0.0  # expand only gists with u > tau
    margin: float = 0.0  # a swap must gain more than this
    cooldown: int = 2
    protect: int = 2  # newest raw blocks that never collapse
    iteration: int = 0
    last_flip: dict = field(default_factory=dict)  # key -> iteration of its last change
    log: list = field(default_factory=list)  # (iteration, "expand" | "collapse" | "forced", level, index)

    def _cool(self, key) -> bool:
        return key in self.last_flip and self.iteration - self.last_flip[key] <= self.cooldown

    def _act(self, action: str, e: Entry) -> None:
        self.last_flip[_key(e)] = self.iteration
        self.log.append((self.iteration, action, e.level, e.index))

    def step(self, tree, entries: list, utility) -> list:
        """One iteration: the new entries. utility: one score per entry (None: forced collapses only, oldest
        first)."""
        self.iteration += 1
        block = tree.block
        score = dict(zip(entries, utility)) if utility is not None else {}
        entries = list(entries)
        newest = len(tree.tokens) // block - self.protect
        while cost(tree, entries) > self.budget:  # forced: the tail grew past the budget
            raws = [e for e in entries if e.level == 0 and e.index < newest]
            raws = raws or [e for e in entries if e.level == 0][:1]  # a budget this small can't protect them
            if raws:
                victim = min(raws, key=lambda e: (score.get(e, 0.0), e.index))
                entries[entries.index(victim)] = Entry(1, victim.index)
                self._act("forced", victim)
                continue
            group = self._full_group(tree, entries)
            if group is None:
                raise ValueError(f"budget {self.budget} is below the coarsest tiling's cost")
            at = entries.index(Entry(1, group * block))
            entries[at : at + block] = [Entry(2, group)]
            self._act("forced", Entry(2, group))
        if utility is None:
            return entries
        actions = 0
        expand = sorted(
            (e for e in entries if e.level > 0 and score.get(e, self.tau) > self.tau and not self._cool(_key(e))),
            key=lambda e: -score[e],
        )
        for e in expand:
            if actions >= self.n_diff:
                break
            if cost(tree, entries) + block - 1 > self.budget:
                raws = [r for r in entries if r.level == 0 and r.index < newest and r in score
                        and not self._cool(_key(r)) and _key(r) != _key(e)]  # fmt: skip
                if not raws or actions + 2 > self.n_diff:
                    break
                victim = min(raws, key=lambda r: score[r])
                if score[e] - score[victim] <= self.margin:
                    break
                entries[entries.index(victim)] = Entry(1, victim.index)
                self._act("collapse", victim)
                actions += 1
            at = entries.index(e)
            entries[at : at + 1] = (
                [Entry(0, e.index)] if e.level == 1 else [Entry(1, e.index * block + j) for j in range(block)]
            )
            self._act("expand", e)
            actions += 1
        return entries

    def _full_group(self, tree, entries: list):
        """An L2 group whose 32 L1 gists are all in the entries and whose L2 gist exists, oldest first."""
        l1 = {e.index for e in entries if e.level == 1}
        for group in range(len(tree.levels[2])):
            if all(group * tree.block + j in l1 for j in range(tree.block)):
                return group
        return None
