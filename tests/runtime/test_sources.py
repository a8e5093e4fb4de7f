"""Adapter sources against local stand-ins: pvc mounts, an offline HF cache, fsspec, http."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import fsspec
import pytest

from loraplane.runtime.adapters.errors import (
    InvalidAdapter,
    InvalidSource,
    SourceNotFound,
    SourceUnreachable,
)
from loraplane.runtime.adapters.sources import ADAPTER_FILES, Fetcher, split_source

COMMIT = "a" * 40


def same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ADAPTER_FILES)


@pytest.fixture
def poet(demo_dir) -> Path:
    return demo_dir[1]["poet"]


def test_split_source_and_local_paths(tmp_path, poet):
    assert split_source("/abs/x") == ("file", "/abs/x")
    assert split_source("file:///abs/x") == ("file", "/abs/x")
    assert split_source("hf://org/name@v1") == ("hf", "org/name@v1")
    with pytest.raises(InvalidSource, match="scheme"):
        split_source("gs://bucket/x")
    fetcher = Fetcher(tmp_path / "cache", tmp_path / "pvc")
    assert fetcher.fetch(f"file://{poet}") == poet
    claim = tmp_path / "pvc" / "claim" / "adapters" / "poet"
    shutil.copytree(poet, claim)
    assert fetcher.fetch("pvc://claim/adapters/poet") == claim.resolve()
    with pytest.raises(InvalidSource, match="inside the claim"):
        fetcher.fetch("pvc://claim/../../../etc")
    with pytest.raises(SourceNotFound):
        fetcher.fetch("pvc://claim/missing")


def _hf_cache(root: Path, repo: str, files_from: Path, ref: str) -> None:
    # huggingface_hub's cache layout: refs/<revision> names a snapshot directory.
    repo_dir = root / "hf" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy(files_from / name, snapshot / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / ref).write_text(COMMIT)


def test_hf_source_through_huggingface_hub_offline(tmp_path, poet, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _hf_cache(tmp_path / "cache", "acme/poet-lora", poet, "v1")
    fetcher = Fetcher(tmp_path / "cache", tmp_path / "pvc")
    got = fetcher.fetch("hf://acme/poet-lora@v1")
    assert got.name == COMMIT and same_files(got, poet)
    assert fetcher.fetch("hf://acme/poet-lora", revision="v1") == got
    with pytest.raises(InvalidSource, match="revision"):
        fetcher.fetch("hf://acme/poet-lora@v1", revision="v2")
    with pytest.raises(SourceUnreachable, match="acme/absent"):
        fetcher.fetch("hf://acme/absent")
    with pytest.raises(InvalidSource):
        fetcher.fetch("hf://a/b/c")


def test_hf_arguments_reach_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    fetcher = Fetcher(tmp_path / "cache", tmp_path / "pvc", hf_token="from-env")
    fetcher.fetch("hf://acme/poet-lora@v2", credentials={"HF_TOKEN": "from-secret"})
    fetcher.fetch("hf://acme/base", model=True)
    adapter, model = calls
    assert adapter == {
        "repo_id": "acme/poet-lora",
        "revision": "v2",
        "token": "from-secret",
        "cache_dir": str(tmp_path / "cache" / "hf"),
        "allow_patterns": list(ADAPTER_FILES),
        "etag_timeout": 10.0,  # a hub that stops answering is given up on
    }
    assert model["token"] == "from-env" and model["revision"] is None
    assert "*.safetensors" in model["allow_patterns"] and "tokenizer*" in model["allow_patterns"]


def test_s3_source_through_an_fsspec_filesystem(tmp_path, poet):
    memory = fsspec.filesystem("memory")
    for name in ADAPTER_FILES:
        memory.pipe(f"/bucket/team/poet/{name}", (poet / name).read_bytes())
    asked = []

    def filesystem(protocol: str, **options):
        asked.append((protocol, options))
        return memory

    fetcher = Fetcher(tmp_path / "cache", tmp_path / "pvc", filesystem=filesystem)
    secret = {
        "AWS_ACCESS_KEY_ID": "AKIA",
        "AWS_SECRET_ACCESS_KEY": "shh",
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://minio:9000",
    }
    got = fetcher.fetch("s3://bucket/team/poet", credentials=secret)
    assert same_files(got, poet) and got.is_relative_to(tmp_path / "cache")
    assert asked == [
        (
            "s3",
            {
                "key": "AKIA",
                "secret": "shh",
                "endpoint_url": "http://minio:9000",
                "client_kwargs": {"region_name": "eu-west-1"},
            },
        )
    ]
    assert fetcher.fetch("s3://bucket/team/poet") == got  # cached: no second download
    assert len(asked) == 1
    with pytest.raises(SourceNotFound):
        fetcher.fetch("s3://bucket/team/absent")
    assert asked[-1] == ("s3", {})  # no secret: s3fs's own chain (env, IAM role)
    with pytest.raises(InvalidSource, match="AWS_PASSWORD"):
        fetcher.fetch("s3://bucket/team/poet", credentials={"AWS_PASSWORD": "x"})
    assert not list((tmp_path / "cache" / "sources").glob(".partial-*"))


def test_a_bearer_token_goes_only_over_https(tmp_path, poet, https_root):
    root, url, trust = https_root
    shutil.copytree(poet, root / "private" / "poet")
    fetcher = Fetcher(tmp_path / "cache", tmp_path / "pvc", tls_verify=trust)
    with pytest.raises(SourceUnreachable, match="401"):
        fetcher.fetch(f"{url}/private/poet")
    got = fetcher.fetch(f"{url}/private/poet", credentials={"BEARER_TOKEN": "sesame"})
    assert same_files(got, poet)


def test_https_source_files_and_archives(tmp_path, poet, http_root):
    root, url = http_root
    shutil.copytree(poet, root / "poet")
    with tarfile.open(root / "poet.tar.gz", "w:gz") as tar:
        for name in ADAPTER_FILES:
            tar.add(poet / name, arcname=f"poet-lora/{name}")
        evil = tarfile.TarInfo("../../escape.txt")
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
    with zipfile.ZipFile(root / "poet.zip", "w") as z:
        for name in ADAPTER_FILES:
            z.write(poet / name, arcname=name)
    fetcher = Fetcher(tmp_path / "cache", tmp_path / "pvc")
    for source in (f"{url}/poet", f"{url}/poet.tar.gz", f"{url}/poet.zip"):
        got = fetcher.fetch(source)
        assert same_files(got, poet), source
        assert sorted(p.name for p in got.iterdir()) == sorted(ADAPTER_FILES)
    assert not list(tmp_path.rglob("escape.txt"))
    shutil.copytree(poet, root / "private" / "poet")
    with pytest.raises(SourceUnreachable, match="401"):
        fetcher.fetch(f"{url}/private/poet")
    with pytest.raises(InvalidSource, match="in clear"):  # never over plain http
        fetcher.fetch(f"{url}/private/poet", credentials={"BEARER_TOKEN": "sesame"})
    with pytest.raises(SourceNotFound, match="404"):
        fetcher.fetch(f"{url}/absent")
    (root / "broken.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(InvalidAdapter, match="archive"):
        fetcher.fetch(f"{url}/broken.tar.gz")


def test_base_model_from_a_source_uri(tmp_path, demo_dir):
    from loraplane.runtime.config import RuntimeConfig
    from loraplane.runtime.runtime import Runtime

    base, _ = demo_dir
    memory = fsspec.filesystem("memory")
    for f in base.iterdir():
        memory.pipe(f"/models/tiny-base/{f.name}", f.read_bytes())
    config = RuntimeConfig(
        model="s3://models/tiny-base",
        cache_dir=tmp_path / "c",
        pvc_root=tmp_path / "pvc",
        allow_unauthenticated_admin=True,
    )
    fetcher = Fetcher(config.cache_dir, config.pvc_root, filesystem=lambda *_, **__: memory)
    runtime = Runtime(config, fetcher=fetcher)
    try:
        assert runtime.base_name == "tiny-base"
        assert runtime.model_dir.is_relative_to(tmp_path / "c")
        assert {p.name for p in runtime.model_dir.iterdir()} >= {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
        }
    finally:
        runtime.stop()


@pytest.mark.slow
def test_real_s3fs_against_an_unreachable_endpoint_is_a_502(tmp_path):
    # s3fs retries with backoff, hence slow; the error must still be ours, not botocore's.
    fetcher = Fetcher(tmp_path / "cache", tmp_path / "pvc")
    secret = {
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
    }
    with pytest.raises(SourceUnreachable) as err:
        fetcher.fetch("s3://bucket/adapter", credentials=secret)
    assert err.value.status == 502


def test_new_content_behind_the_same_url_is_fetched_again(tmp_path, demo_dir, http_root):
    import hashlib

    import httpx
    from runtime_helpers import RunningServer, make_config

    base, adapters = demo_dir
    root, url = http_root

    def serve(name: str) -> str:
        shutil.rmtree(root / "lora", ignore_errors=True)
        shutil.copytree(adapters[name], root / "lora")
        return hashlib.sha256(
            (adapters[name] / "adapter_model.safetensors").read_bytes()
        ).hexdigest()

    with RunningServer(make_config(base, tmp_path)) as server:

        def put(sha256: str) -> httpx.Response:
            body = {"source": f"{url}/lora", "sha256": sha256}
            return httpx.put(f"{server.url}/v1/adapters/lora", json=body, timeout=60)

        poet = serve("poet")
        sql = serve("sql-expert")  # the server has the wrong file at first
        assert put(poet).status_code == 422
        serve("poet")  # fixed: a retry must not be answered from the bad download
        r = put(poet)
        assert r.status_code == 201 and r.json()["sha256"] == poet, r.text
        serve("sql-expert")  # the owner publishes new weights at the same URL
        r = put(sql)
        assert r.status_code == 201 and r.json()["sha256"] == sql, r.text
