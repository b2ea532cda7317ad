import subprocess

import numpy as np
import pytest
from conftest import write_files

from mlx_ltc import data
from mlx_ltc.errors import UserError


def test_walk_skips_binary_huge_nonutf8_empty_and_honours_gitignore(tmp_path):
    repo = write_files(
        tmp_path,
        {
            "a.py": "print('a')\n",
            "sub/b.rs": "fn main() {}\n",
            "img.png": b"\x89PNG\r\n\x1a\n\0\0\0",
            "big.txt": "x" * 2000,
            "latin.py": "caf\xe9 = 1\n".encode("latin-1"),
            "empty.py": "   \n",
            "ignored.py": "secret = 1\n",
            "build/out.py": "x = 1\n",
            ".gitignore": "ignored.py\nbuild/\n",
            ".hidden/c.py": "x = 1\n",
            "__pycache__/a.cpython-311.pyc": b"\0\0",
            "package-lock.json": "{}\n",
        },
    )
    scan = data.scan(repo, max_file_bytes=1000)
    assert scan.listing == "walk"
    # hidden directories, __pycache__ and ignored paths are never listed; .gitignore itself is
    # a repo file, as in `git ls-files`
    assert [f.path for f in scan.files] == [".gitignore", "a.py", "sub/b.rs"]
    assert dict(scan.skipped) == {
        "big.txt": "too large",
        "empty.py": "empty",
        "img.png": "binary",
        "latin.py": "not UTF-8",
        "package-lock.json": "generated or data",
    }


def test_git_listing_uses_ls_files(tmp_path):
    repo = write_files(tmp_path, {"a.py": "x = 1\n", "b.py": "y = 2\n", "junk.log": "log\n", ".gitignore": "*.log\n"})
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    scan = data.scan(repo)
    assert scan.listing == "git"
    assert {f.path for f in scan.files} == {"a.py", "b.py", ".gitignore"}


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "is empty"),
        ({"a.bin": b"\0\1\2", "b.bin": b"\0"}, "no text source files"),
    ],
)
def test_unusable_repos_are_user_errors(tmp_path, files, message):
    repo = write_files(tmp_path / "r", files)
    repo.mkdir(exist_ok=True)
    with pytest.raises(UserError, match=message):
        data.scan(repo)


def test_missing_repo(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.scan(tmp_path / "nope")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_dataset_uses_repo_format_and_predicts_every_token_once(small_repo, tokenizer):
    scan = data.scan(small_repo)
    ds = data.build(scan, tokenizer, seq_len=64, val_fraction=0.2)
    assert ds.meta["format"] == {"repo": "<repo_name>", "file": "<file_sep>", "eos": "<|endoftext|>"}
    for split in (ds.train, ds.val):
        assert all(2 <= len(r) <= 65 for r in split.rows)
        assert all(len(r) == 65 for r in split.rows[:-1])  # only the last window is short
        # windows overlap by exactly one token: stitching them back gives the split's stream
        stream = np.concatenate([split.rows[0]] + [r[1:] for r in split.rows[1:]])
        for a, b in zip(split.rows, split.rows[1:]):
            assert a[-1] == b[0]
        text = tokenizer.decode(stream)
        assert text.startswith("<repo_name>repo<file_sep>") and text.endswith("<|endoftext|>")
        assert split.predicted_tokens == len(stream) - 1


def test_split_is_by_file_and_near_the_requested_fraction(small_repo, tokenizer):
    ds = data.build(data.scan(small_repo), tokenizer, seq_len=64, val_fraction=0.2, seed=3)
    train_files = {f["path"] for f in ds.meta["files"]["train"]}
    val_files = {f["path"] for f in ds.meta["files"]["val"]}
    assert train_files and val_files and not train_files & val_files
    assert train_files | val_files == {f.path for f in data.scan(small_repo).files}
    val_text = tokenizer.decode(np.concatenate(ds.val.rows))
    for path in train_files:
        assert f"<file_sep>{path}\n" not in val_text
    share = ds.meta["tokens"]["val"] / (ds.meta["tokens"]["val"] + ds.meta["tokens"]["train"])
    assert 0.1 <= share <= 0.3


def test_split_is_deterministic_and_seeded(small_repo, tokenizer):
    scan = data.scan(small_repo)
    val = lambda seed: [f["path"] for f in data.build(scan, tokenizer, 64, 0.2, seed).meta["files"]["val"]]  # noqa: E731
    assert val(0) == val(0)
    assert any(val(0) != val(s) for s in range(1, 6))


def test_single_file_repo_cannot_be_split(tmp_path, tokenizer):
    repo = write_files(tmp_path, {"only.py": "x = 1\n"})
    with pytest.raises(UserError, match="at least 2"):
        data.build(data.scan(repo), tokenizer, 64)


def test_dataset_round_trips_through_jsonl(small_repo, tokenizer, tmp_path):
    ds = data.build(data.scan(small_repo), tokenizer, 64, 0.2)
    ds.save(tmp_path / "d")
    back = data.Dataset.load(tmp_path / "d")
    assert back.meta == ds.meta
    assert all(np.array_equal(a, b) for a, b in zip(back.train.rows, ds.train.rows))
    assert len(back.val) == len(ds.val)
