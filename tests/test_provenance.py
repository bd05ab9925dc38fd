"""utils/provenance.py: the code version and environment a run records."""
from __future__ import annotations

import subprocess

import torch

import utils.provenance as provenance


def _git(folder, *args):
    subprocess.run(["git", "-C", str(folder), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


def test_code_version_is_the_commit_and_says_dirty(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    monkeypatch.setattr(provenance, "REPO", repo)
    provenance.code_version.cache_clear()
    try:
        assert provenance.code_version() == head and len(head) == 12
        (repo / "untracked.txt").write_text("not code")     # untracked files do not count
        provenance.code_version.cache_clear()
        assert provenance.code_version() == head
        (repo / "a.py").write_text("x = 2\n")
        provenance.code_version.cache_clear()
        assert provenance.code_version() == head + "+dirty"
        monkeypatch.setattr(provenance, "REPO", tmp_path / "not-a-repo")
        provenance.code_version.cache_clear()
        assert provenance.code_version() == "unknown"
    finally:
        provenance.code_version.cache_clear()


def test_environment_names_code_versions_and_device():
    env = provenance.environment(torch.device("cpu"))
    assert set(env) == {"code", "python", "torch", "device"}
    assert env["torch"] == torch.__version__ and env["device"]
