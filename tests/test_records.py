"""Typed hand-offs: records read back what they write, and files from older versions still load."""

import json
from dataclasses import dataclass, field

import pytest

from mlx_ltc import data, run
from mlx_ltc.errors import UserError
from mlx_ltc.hardware import profile
from mlx_ltc.records import Record


@dataclass(frozen=True)
class Leaf(Record):
    n: int
    note: str | None = None


@dataclass(frozen=True)
class Tree(Record):
    name: str
    leaf: Leaf
    by_key: dict[str, Leaf]
    leaves: list[Leaf] = field(default_factory=list)
    maybe: Leaf | None = None


def test_nested_records_round_trip_and_old_files_get_defaults():
    raw = {"name": "t", "leaf": {"n": 1}, "by_key": {"a": {"n": 2, "note": "x"}}, "leaves": [{"n": 3}]}
    tree = Tree.from_json(raw)
    assert tree.by_key["a"] == Leaf(2, "x") and tree.leaves == [Leaf(3)] and tree.maybe is None
    assert tree.to_json() == raw | {"leaf": {"n": 1, "note": None}, "leaves": [{"n": 3, "note": None}], "maybe": None}
    assert Tree.from_json(tree.to_json()) == tree


def test_a_file_missing_a_required_key_is_one_clear_error():
    with pytest.raises(UserError, match=r"^data/metadata.json: missing leaf, by_key$"):
        Tree.from_json({"name": "t"}, "data/metadata.json")
    with pytest.raises(UserError, match="expected a JSON object, got list"):
        Tree.from_json([1, 2])


# metadata.json as the first format-1 builds wrote it: no blobs, mix, roles, QA probes or chain share
OLD_METADATA = {
    "format_version": 1,
    "repo": "/tmp/repo",
    "tokenizer_hash": "abc",
    "vocab_size": 49152,
    "dtype": "uint16",
    "seq_len": 256,
    "config": {"split": "85/10/5"},
    "packing_efficiency": 0.97,
    "splits": {
        s: {
            "sequences": n,
            "tokens": 256 * n,
            "useful_tokens": 250 * n,
            "pad_tokens": 6 * n,
            "packing_efficiency": 0.97,
            "documents": n,
            "files": n,
            "difficulty": {"mean": 0.5, "p10": 0.4, "p90": 0.6},
        }
        for s, n in (("train", 8), ("val", 2), ("test", 1))
    },  # fmt: skip
    "files_by_split": {"train": ["a.py"], "val": ["b.py"], "test": ["c.py"]},
    "files": 3,
    "skipped": {},
    "documents": {"file": 11},
    "chains": {"note": "off", "chains": 0},
    "qa": {},
    "cache": {"processed": 3, "cached": 0},
}


def test_old_dataset_metadata_loads_and_summarises(tmp_path):
    (tmp_path / "metadata.json").write_text(json.dumps(OLD_METADATA))
    meta = data.load_metadata(tmp_path)
    assert meta.splits["val"].sequences == 2 and meta.mix is None and meta.blobs == {}
    assert meta.chains.note == "off" and meta.qa.buckets == [] and meta.markers is None
    text = run.data_summary(meta)
    assert text.startswith("data: 3 files -> 8 / 2 / 1 train/val/test sequences of 256 tokens")
    assert "data mix:" in text  # no mix recorded: an empty section, not an error


def test_damaged_metadata_is_one_clear_error(tmp_path):
    (tmp_path / "metadata.json").write_text('{"seq_len": 256')
    with pytest.raises(UserError, match="metadata.json is damaged"):
        data.load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({"seq_len": 256}))
    with pytest.raises(UserError, match="missing dtype, tokenizer_hash, splits, files_by_split"):
        data.load_metadata(tmp_path)


def test_a_cached_profile_reads_back_as_the_profile_written(tmp_path):
    machine = profile.Machine("cpu", "cpu", 24 << 30, 20 << 30, 2, 2, "0.32.0")
    probes = [profile.Probe(256, True, 1 << 20, 0.5, 512.0, 1), profile.Probe(8192, False, None, None, None, 1, "over")]
    found = profile.Profile(
        model="tiny", backend="cpu", device_name="cpu", memory_budget=5 << 30, weights_bytes=1 << 20,
        max_seq_len=4096, tokens_per_s=100.0, layers_per_stage=3, batch_size=1, settings={"memory": {"staged": True}},
        machine=machine, matmul_gflops={"fp32": 90.0}, bf16=False, probes=probes,
    )  # fmt: skip
    written = found.to_json()
    assert "gpu_memory" not in written["machine"]  # a CPU profile has no GPU keys, as before
    path = profile.cache_path(tmp_path, "tiny", profile.backend(), {"staged": True})
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(written))
    assert profile.cached(tmp_path, "tiny", {"staged": True}) == found
    assert profile.cached(tmp_path, "tiny", {"staged": True}, budget=1 << 30) is None  # another budget
    path.write_text('{"model": "tiny"}')  # from an unknown version: measured again, not an error
    assert profile.cached(tmp_path, "tiny", {"staged": True}) is None
