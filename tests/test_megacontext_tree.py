"""The MegaContext tree: gisting as blocks complete, and the per-level files round-trip exactly."""

import numpy as np
import pytest

from mlx_ltc.errors import UserError
from mlx_ltc.research.megacontext import tree as mc_tree

WIDTH = 8


def embeddings():
    return np.random.default_rng(0).normal(size=(100, WIDTH)).astype(np.float32)


def tokens(n, seed=1):
    return np.random.default_rng(seed).integers(0, 100, n).astype(np.int32)


def built(n=2 * 1024 + 70, pieces=(1,)):
    t, gist = mc_tree.GistTree(width=WIDTH, model_id="smollm2-135m"), mc_tree.mean_gist(embeddings())
    ids = tokens(n)
    cuts = [0, *sorted(int(n * p) for p in pieces)]
    for a, b in zip(cuts, cuts[1:]):
        t.append(ids[a:b], gist)
    return t, ids


def test_blocks_are_gisted_as_they_complete_and_the_tail_stays_raw():
    t, ids = built()
    n1, n2 = len(ids) // 32, len(ids) // 1024
    assert [len(level) for level in t.levels] == [len(ids), n1, n2] == [2118, 66, 2]
    emb = embeddings()
    np.testing.assert_allclose(t.levels[1][5], emb[ids[160:192]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(t.levels[2][1], t.levels[1][32:64].mean(0), rtol=1e-6)
    assert t.span(1, 5) == (160, 192) and t.span(2, 1) == (1024, 2048)


def test_appending_in_pieces_builds_the_same_tree():
    whole, _ = built()
    pieces, _ = built(pieces=(0.013, 0.31, 0.5, 0.77, 1))
    for a, b in zip(whole.levels, pieces.levels):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_is_identical(tmp_path, dtype):
    t, _ = built()
    t.dtype = dtype
    t.levels[1:] = [level.astype(dtype) for level in t.levels[1:]]
    t.save(tmp_path / "tree")
    assert sorted(p.name for p in (tmp_path / "tree").iterdir()) == ["level0.bin", "level1.bin", "level2.bin"]
    back = mc_tree.load(tmp_path / "tree", model_id="smollm2-135m")
    assert (back.width, back.model_id, back.block, back.dtype) == (WIDTH, "smollm2-135m", 32, dtype)
    for a, b in zip(t.levels, back.levels):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # the loaded tree keeps growing like the original
    more = tokens(1000, seed=2)
    for tree in (t, back):
        tree.append(more, mc_tree.mean_gist(embeddings()))
    for a, b in zip(t.levels, back.levels):
        assert np.array_equal(a, b)
    # rows sit at fixed offsets: header + index * row bytes
    raw = (tmp_path / "tree" / "level1.bin").read_bytes()
    row = np.dtype(dtype).itemsize * WIDTH
    assert np.array_equal(np.frombuffer(raw[128 + 7 * row : 128 + 8 * row], dtype), t.levels[1][7])


def test_damaged_or_foreign_trees_are_one_clear_error(tmp_path):
    t, _ = built()
    t.save(tmp_path / "tree")
    with pytest.raises(UserError, match="not 'other-model'"):
        mc_tree.load(tmp_path / "tree", model_id="other-model")
    level1 = tmp_path / "tree" / "level1.bin"
    level1.write_bytes(level1.read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated"):
        mc_tree.load(tmp_path / "tree")
    t.save(tmp_path / "tree")  # the save replaces the damaged directory whole
    assert len(mc_tree.load(tmp_path / "tree").levels[1]) == 66
    (tmp_path / "tree" / "level2.bin").write_bytes(b"not a tree level")
    with pytest.raises(UserError, match="bad magic"):
        mc_tree.load(tmp_path / "tree")
    with pytest.raises(UserError, match="no such"):
        mc_tree.load(tmp_path / "missing")
    t.levels[1] = t.levels[1][:-1]  # a gist missing for a complete block
    t.save(tmp_path / "short")
    with pytest.raises(UserError, match="level 1 has 65 gists for 2118"):
        mc_tree.load(tmp_path / "short")
