import subprocess
import time

import pytest

from mlx_ltc.data.history import Chain, Version, commit_chains, format_chain

NATIVE = {
    "file": "<file_sep>",
    "commit_before": "<commit_before>",
    "commit_msg": "<commit_msg>",
    "commit_after": "<commit_after>",
}


HOSTILE_CONFIG = """\
[log]
    showRoot = false
    diffMerges = combined
    showSignature = true
    abbrevCommit = true
    decorate = full
[diff]
    renames = false
    relative = true
[color]
    ui = always
[core]
    abbrev = 8
"""


@pytest.fixture(autouse=True)
def isolated_git(monkeypatch, tmp_path):
    """No user or system config, except settings that change `git log` output if not overridden."""
    (tmp_path / "gitconfig").write_text(HOSTILE_CONFIG)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "Test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@example.com")


def git(repo, *args, input=None) -> str:
    cmd = ["git", "-C", str(repo), "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, check=True, capture_output=True, input=input).stdout.decode().strip()


def init(path):
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    return path


def commit(repo, message, files) -> str:
    """Write (str or bytes) or delete (None) files, commit everything, return the sha."""
    for rel, content in files.items():
        path = repo / rel
        if content is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def summary(history):
    return {c.path: [(v.sha, v.message, v.text) for v in c.versions] for c in history.chains}


def test_chain_has_versions_and_messages_in_order(tmp_path):
    repo = init(tmp_path / "repo")
    s1 = commit(repo, "add a", {"a.py": "x = 1\n", "same.py": "never changes\n"})
    s2 = commit(repo, "grow a\n\nwith a body line", {"a.py": "x = 1\ny = 2\n"})
    commit(repo, "unrelated", {"b.py": "b\n"})
    s4 = commit(repo, "shrink a", {"a.py": "y = 2\n"})
    (repo / "a.py").chmod(0o755)
    commit(repo, "mode change only: not a new version", {})
    history = commit_chains(repo, ["a.py", "b.py", "same.py"])
    assert summary(history) == {
        "a.py": [
            (s1, "add a", "x = 1\n"),
            (s2, "grow a\n\nwith a body line", "x = 1\ny = 2\n"),
            (s4, "shrink a", "y = 2\n"),
        ]
    }
    assert (history.commits, history.shallow, history.note) == (5, False, None)
    assert history.skipped == {"fewer than 2 versions": 2}


def test_max_versions_keeps_the_newest(tmp_path):
    repo = init(tmp_path / "repo")
    shas = [commit(repo, f"v{i}", {"a.py": f"v = {i}\n"}) for i in range(8)]
    history = commit_chains(repo, ["a.py"], max_versions=3)
    assert summary(history) == {"a.py": [(shas[i], f"v{i}", f"v = {i}\n") for i in (5, 6, 7)]}
    assert history.skipped == {}


def test_unusable_versions_cut_the_chain_and_are_counted(tmp_path):
    repo = init(tmp_path / "repo")
    commit(repo, "one", {"bin.py": "a\n", "big.py": "a\n", "latin.py": "a\n"})
    commit(
        repo,
        "bad",
        {"bin.py": b"a\0b\n", "big.py": "x" * 60 + "\n" + "y\n" * 60, "latin.py": "caf\xe9\n".encode("latin-1")},
    )
    s3 = commit(repo, "good", {"bin.py": "b\n", "big.py": "b\n", "latin.py": "b\n"})
    s4 = commit(repo, "better", {"bin.py": "c\n", "big.py": "c\n", "latin.py": "c\n"})
    history = commit_chains(repo, ["big.py", "bin.py", "latin.py"], max_file_bytes=100)
    expected = [(s3, "good", "b\n"), (s4, "better", "c\n")]
    assert summary(history) == {"big.py": expected, "bin.py": expected, "latin.py": expected}
    assert history.skipped == {"binary": 1, "not UTF-8": 1, "too large": 1}


def test_huge_diff_transition_cuts_the_chain(tmp_path):
    repo = init(tmp_path / "repo")
    commit(repo, "small", {"a.py": "".join(f"line {i}\n" for i in range(5))})
    big = "".join(f"new {i}\n" for i in range(50))
    s2 = commit(repo, "rewrite", {"a.py": big})
    s3 = commit(repo, "tweak", {"a.py": big + "one more\n"})
    history = commit_chains(repo, ["a.py"], max_diff_lines=10)
    assert summary(history) == {"a.py": [(s2, "rewrite", big), (s3, "tweak", big + "one more\n")]}
    assert history.skipped == {"huge diff": 1}
    assert len(commit_chains(repo, ["a.py"], max_diff_lines=55).chains[0].versions) == 3


def test_not_a_repo_unborn_head_and_missing_git(tmp_path, monkeypatch):
    (tmp_path / "plain").mkdir()
    history = commit_chains(tmp_path / "plain", ["a.py"])
    assert (history.chains, history.note) == ([], "not a git repository: no commit-evolution chains")
    assert commit_chains(tmp_path / "does-not-exist", ["a.py"]).note == history.note

    repo = init(tmp_path / "unborn")
    (repo / "a.py").write_text("x\n")
    git(repo, "add", "a.py")
    history = commit_chains(repo, ["a.py"])
    assert (history.chains, history.commits, history.note) == ([], 0, "no commits yet: no commit-evolution chains")

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    history = commit_chains(repo, ["a.py"])
    assert (history.chains, history.note) == ([], "git not found: no commit-evolution chains")


def test_shallow_clone_uses_the_fetched_history(tmp_path):
    origin = init(tmp_path / "origin")
    shas = [commit(origin, f"v{i}", {"a.py": f"v = {i}\n"}) for i in range(5)]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "2", f"file://{origin}", str(clone)], check=True)
    history = commit_chains(clone, ["a.py"])
    assert summary(history) == {"a.py": [(shas[3], "v3", "v = 3\n"), (shas[4], "v4", "v = 4\n")]}
    assert (history.shallow, history.commits) == (True, 2)
    assert history.note == "shallow clone: chains use only the 2 commits fetched"
    assert len(commit_chains(origin, ["a.py"]).chains[0].versions) == 5


def test_merge_is_one_first_parent_step(tmp_path):
    repo = init(tmp_path / "repo")
    s1 = commit(repo, "base", {"a.py": "a0\n", "b.py": "b0\n"})
    git(repo, "checkout", "-q", "-b", "side")
    commit(repo, "side edits b", {"b.py": "b1\n"})
    commit(repo, "side edits b again", {"b.py": "b2\n"})
    git(repo, "checkout", "-q", "main")
    s4 = commit(repo, "main edits a", {"a.py": "a1\n"})
    git(repo, "merge", "-q", "--no-ff", "-m", "merge side", "side")
    merge = git(repo, "rev-parse", "HEAD")
    history = commit_chains(repo, ["a.py", "b.py"])
    assert summary(history) == {
        "a.py": [(s1, "base", "a0\n"), (s4, "main edits a", "a1\n")],
        "b.py": [(s1, "base", "b0\n"), (merge, "merge side", "b2\n")],
    }
    assert history.commits == 3


def test_renames_are_followed_and_readds_start_over(tmp_path):
    repo = init(tmp_path / "repo")
    body = "".join(f"line {i}\n" for i in range(20))
    s1 = commit(repo, "old name", {"old.py": body, "gone.py": "g1\n"})
    commit(repo, "edit gone", {"gone.py": "g2\n"})
    git(repo, "mv", "old.py", "new.py")
    s3 = commit(repo, "rename and edit", {"new.py": body + "more\n", "gone.py": None})
    s4 = commit(repo, "re-add gone", {"gone.py": "g3\n"})
    s5 = commit(repo, "edit both", {"gone.py": "g4\n", "new.py": body})
    history = commit_chains(repo, ["gone.py", "new.py"])
    assert summary(history) == {
        "gone.py": [(s4, "re-add gone", "g3\n"), (s5, "edit both", "g4\n")],
        "new.py": [(s1, "old name", body), (s3, "rename and edit", body + "more\n"), (s5, "edit both", body)],
    }
    assert history.skipped == {"deleted and re-added": 1}


def test_odd_paths_submodules_and_a_subdirectory_root(tmp_path):
    repo = init(tmp_path / "repo")
    odd = ["dir with space/naïve file.py", "new\nline.py", "sub/ü.py"]
    s1 = commit(repo, "one", {p: "1\n" for p in odd})
    for path in ("vendor/lib", "was-submodule"):
        git(repo, "update-index", "--add", "--cacheinfo", f"160000,{s1},{path}")
    git(repo, "commit", "-q", "-m", "add submodules")
    git(repo, "rm", "-q", "--cached", "was-submodule")
    s3 = commit(repo, "vendor it", {"was-submodule": "v1\n"})
    s4 = commit(repo, "two", {p: "2\n" for p in odd} | {"was-submodule": "v2\n"})
    history = commit_chains(repo, [*odd, "vendor/lib", "was-submodule"])
    assert summary(history) == {p: [(s1, "one", "1\n"), (s4, "two", "2\n")] for p in odd} | {
        "was-submodule": [(s3, "vendor it", "v1\n"), (s4, "two", "v2\n")]
    }
    assert history.skipped == {"submodule": 2}
    history = commit_chains(repo / "sub", ["ü.py"])
    assert summary(history) == {"ü.py": [(s1, "one", "1\n"), (s4, "two", "2\n")]}


def fast_import(repo, commits, files):
    """A linear history in which commit i appends to files i % files and 7 * i % files.
    Returns path -> [(commit message, text)] in commit order."""
    stream, versions = [], {}
    for i in range(commits):
        message = f"commit {i}\n"
        stream += [f"commit refs/heads/main\nmark :{i + 1}\ncommitter T <t@t> {1_700_000_000 + i} +0000\n"]
        stream += [f"data {len(message)}\n{message}", f"from :{i}\n" if i else ""]
        for path in sorted({f"pkg/m{i % files}.py", f"pkg/m{7 * i % files}.py"}):
            old = versions.setdefault(path, [])
            text = (old[-1][1] if old else "") + f"def f{i}():\n    return {i}\n"
            old.append((f"commit {i}", text))
            stream += [f"M 100644 inline {path}\ndata {len(text)}\n{text}\n"]
    git(repo, "fast-import", "--quiet", input="".join(stream).encode())
    git(repo, "reset", "-q", "--hard", "main")
    return versions


def test_hundreds_of_commits(tmp_path):
    repo = init(tmp_path / "repo")
    versions = fast_import(repo, 400, 40)
    start = time.perf_counter()
    history = commit_chains(repo, sorted(versions), max_versions=4)
    elapsed = time.perf_counter() - start
    assert {c.path: [(v.message, v.text) for v in c.versions] for c in history.chains} == {
        path: vs[-4:] for path, vs in versions.items()
    }
    assert (history.commits, len(history.chains), history.skipped) == (400, 40, {})
    assert elapsed < 10


def test_format_chain_native_and_plain():
    chain = Chain(
        "src/a.py",
        [Version("a" * 40, "add", "x = 1\n"), Version("b" * 40, "grow\n\nwhy it grew", "x = 1\ny = 2")],
    )
    assert format_chain(chain, NATIVE) == (
        "<file_sep>src/a.py\n<commit_before>x = 1\n<commit_msg>grow\n\nwhy it grew<commit_after>x = 1\ny = 2"
    )
    assert format_chain(chain, {"file": None, "commit_before": None, "commit_msg": None, "commit_after": None}) == (
        "### src/a.py\n"
        "# history of src/a.py: 2 versions, oldest first\n"
        "# --- version aaaaaaaaaa ---\n"
        "x = 1\n"
        "# --- commit bbbbbbbbbb ---\n"
        "# grow\n"
        "#\n"
        "# why it grew\n"
        "# --- version bbbbbbbbbb ---\n"
        "x = 1\ny = 2\n"
    )
    partial = {**NATIVE, "commit_msg": None}
    assert format_chain(chain, partial).startswith("<file_sep>src/a.py\n# history of src/a.py: 2 versions")
    three = Chain("a.py", [*chain.versions, Version("c" * 40, "end", "z\n")])
    assert format_chain(three, NATIVE).count("<commit_before>") == 2
    assert format_chain(three, NATIVE).endswith("<commit_before>x = 1\ny = 2<commit_msg>end<commit_after>z\n")
