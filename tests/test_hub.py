"""Models from the Hugging Face hub by id: fetched once through
huggingface_hub into its cache, then loaded without the network; a local path
always wins; the error for a missing path names the hub form.  The hub's
download functions are replaced by stand-ins (no test needs the network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import rwkvkit
from conftest import importorskip
from rwkvkit import cli
from rwkvkit.errors import CheckpointError, RwkvkitError
from rwkvkit.hub import parse_id
from rwkvkit.models.rwkv4 import RWKV4Config
from util import make_model


class FakeHub:
    """huggingface_hub's download functions over a dict of repositories
    (repo id -> folder of files), with a cache that local_files_only reads."""

    def __init__(self, repos: dict[str, Path], cache: Path):
        self.repos, self.cache, self.network = repos, cache, []

    def _repo(self, repo):
        if repo not in self.repos:
            raise OSError(f"404 Client Error: Repository Not Found for url: https://huggingface.co/{repo}\nmore")
        return self.repos[repo]

    def _snap(self, repo):
        return self.cache / repo.replace("/", "--") / "snapshots" / "abc123"

    def hf_hub_download(self, repo, filename, revision=None, local_files_only=False, **kw):
        dest = self._snap(repo) / filename
        if local_files_only:
            if not dest.is_file():
                raise FileNotFoundError("LocalEntryNotFoundError: not in the cache")
            return str(dest)
        self.network.append(("file", repo, filename))
        src = self._repo(repo) / filename
        if not src.is_file():
            raise OSError(f"404 Client Error: Entry Not Found for {filename}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
        return str(dest)

    def snapshot_download(self, repo, revision=None, local_files_only=False, allow_patterns=None, **kw):
        snap = self._snap(repo)
        if local_files_only:
            if not snap.is_dir():
                raise FileNotFoundError("LocalEntryNotFoundError: no snapshot in the cache")
            return str(snap)
        self.network.append(("snapshot", repo, tuple(allow_patterns or ())))
        for f in self._repo(repo).iterdir():
            if allow_patterns is None or f.name in allow_patterns:
                snap.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snap / f.name)
        return str(snap)

    def list_repo_files(self, repo, revision=None, **kw):
        self.network.append(("list", repo))
        return sorted(p.name for p in self._repo(repo).iterdir())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    hh = importorskip("huggingface_hub")
    model, sd = make_model(RWKV4Config(n_layer=1, n_embd=16, vocab_size=256), seed=5)
    folder_repo = tmp_path / "remote" / "folder"  # a transformers-style repo
    rwkvkit.save(model, folder_repo)
    (folder_repo / "pytorch_model.bin").write_bytes(b"not wanted: safetensors are there")
    (folder_repo / "README.md").write_text("card")
    many = tmp_path / "remote" / "many"  # a BlinkDL-style repo of .pth files
    many.mkdir(parents=True)
    torch.save(sd, many / "a.pth")
    torch.save({k: v * 2 for k, v in sd.items()}, many / "b.pth")
    fake = FakeHub({"RWKV/tiny-folder": folder_repo, "BlinkDL/tiny-many": many}, tmp_path / "hf-cache")
    for name in ("hf_hub_download", "snapshot_download", "list_repo_files"):
        monkeypatch.setattr(hh, name, getattr(fake, name))
    monkeypatch.chdir(tmp_path)
    fake.model, fake.sd = model, sd
    return fake


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parse_id():
    assert parse_id("RWKV/rwkv-4-169m-pile") == ("RWKV/rwkv-4-169m-pile", None)
    assert parse_id("BlinkDL/rwkv-7-world/RWKV-x070-World-0.1B.pth") == ("BlinkDL/rwkv-7-world", "RWKV-x070-World-0.1B.pth")
    for not_id in ("model.pth", "./a/b", "/abs/a/b", "~/a/b", "C:/a/b", "a//b", "a/b/../c", "a\\b/c"):
        assert parse_id(not_id) is None, not_id


def test_folder_repo_is_fetched_once_then_offline(hub):
    m1 = rwkvkit.load("RWKV/tiny-folder")
    assert _same(m1, hub.model)
    fetched = [n for n in hub.network if n[0] == "snapshot"]
    assert len(fetched) == 1 and "pytorch_model.bin" not in fetched[0][2] and "README.md" not in fetched[0][2]
    n = len(hub.network)
    m2 = rwkvkit.load("RWKV/tiny-folder")  # from the cache: no network call at all
    assert len(hub.network) == n and _same(m2, hub.model)


def test_one_file_of_a_repo_by_filename_and_path_form(hub):
    with pytest.raises(CheckpointError, match=r"holds 2 checkpoints \(a.pth, b.pth\).*filename=.*--model BlinkDL/tiny-many/FILE"):
        rwkvkit.load("BlinkDL/tiny-many")
    b = rwkvkit.load("BlinkDL/tiny-many", filename="b.pth")
    assert torch.equal(b.state_dict()["emb.weight"], 2 * hub.sd["emb.weight"])
    a = rwkvkit.load("BlinkDL/tiny-many/a.pth")
    assert _same(a, hub.model)
    n = len(hub.network)
    rwkvkit.load("BlinkDL/tiny-many/a.pth")
    assert len(hub.network) == n  # cached


def test_a_local_path_wins(hub, tmp_path):
    local = tmp_path / "RWKV" / "tiny-folder"
    m, _ = make_model(RWKV4Config(n_layer=1, n_embd=16, vocab_size=256), seed=9)
    rwkvkit.save(m, local)
    assert _same(rwkvkit.load("RWKV/tiny-folder"), m)
    assert hub.network == []


def test_cli_generate_by_hub_id(hub, capsys):
    rc = cli.main(["generate", "--model", "RWKV/tiny-folder", "-p", "hi", "-n", "8", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == rwkvkit.generate(hub.model, "bytes", "hi", max_tokens=8, temperature=0) + "\n"


def test_missing_paths_name_the_hub_form(hub, capsys):
    with pytest.raises(CheckpointError, match=r"no such file or folder: 'nothing.pth' \(a model on the Hugging Face hub is named by its id, e\.g\. RWKV/rwkv-4-169m-pile"):
        rwkvkit.load("nothing.pth")
    with pytest.raises(CheckpointError, match=r"fetching RWKV/no-such-repo from the Hugging Face hub failed: OSError: 404 Client Error: Repository Not Found"):
        rwkvkit.load("RWKV/no-such-repo")
    with pytest.raises(CheckpointError, match=r"BlinkDL/tiny-many/c.pth from the Hugging Face hub failed: .*Entry Not Found"):
        rwkvkit.load("BlinkDL/tiny-many/c.pth")
    rc = cli.main(["generate", "--model", "./nothing.pth", "-p", "x"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "e.g. RWKV/rwkv-4-169m-pile" in err


def test_without_huggingface_hub_the_error_says_what_to_install(tmp_path, monkeypatch):
    import rwkvkit.hub as hubmod

    monkeypatch.setattr(hubmod, "_hub", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RwkvkitError, match=r"pip install \"rwkvkit\[hub\]\""):
        rwkvkit.load("RWKV/rwkv-4-169m-pile")
