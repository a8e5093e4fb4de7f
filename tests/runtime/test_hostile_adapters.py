"""An adversarial adapter corpus: each one refused at load with a JSON 4xx naming what is wrong,
while a neighbour's requests keep giving exactly PEFT's answers.

The corpus is generated here from a real adapter: non-finite and wrong-typed config values,
hostile regex keys, wrong-shape and non-finite weights, archives that explode or escape, and
sources that are slow, huge, link-local or would leak credentials.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import shutil
import socket
import tarfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from runtime_helpers import RunningServer, make_config, peft_greedy, serve_directory, wait_for
from safetensors.torch import load_file, save_file

from loraplane.api.wire import AdapterErrorCode

PROMPT = "hello world, how are"
MAX_ADAPTER_BYTES = 4 << 20


@dataclass
class Case:
    name: str
    make: Callable[[Path, Path, str], str]  # (template adapter, scratch dir, http url) -> source
    status: int
    code: str
    words: tuple[str, ...]  # each must appear in error.message or error.param


def _copy(template: Path, out: Path) -> Path:
    shutil.copytree(template, out)
    return out


def config_text(text_of: Callable[[dict], str]):
    """A copy whose adapter_config.json is replaced by raw text (NaN, depth: not json.dumps)."""

    def make(template: Path, tmp: Path, _url: str) -> str:
        out = _copy(template, tmp)
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(text_of(config))
        return str(out)

    return make


def config_change(**changes):
    return config_text(lambda c: json.dumps(c | changes))


def raw_field(key: str, raw: str):
    def text(config: dict) -> str:
        config[key] = "@@"
        return json.dumps(config).replace('"@@"', raw)

    return config_text(text)


def weights(change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
    def make(template: Path, tmp: Path, _url: str) -> str:
        out = _copy(template, tmp)
        file = out / "adapter_model.safetensors"
        save_file(change(load_file(str(file))), str(file))
        return str(out)

    return make


def first_a(t: dict) -> str:
    return next(k for k in sorted(t) if "lora_A" in k)


def first_b(t: dict) -> str:
    return next(k for k in sorted(t) if "lora_B" in k)


def poke(key_of, value: float):
    def change(t: dict) -> dict:
        key = key_of(t)
        t[key] = t[key].clone()
        t[key][0, 0] = value
        return t

    return change


def reshape(key_of, rows: int, cols: int):
    def change(t: dict) -> dict:
        key = key_of(t)
        r, c = t[key].shape
        t[key] = torch.zeros(r + rows, c + cols)
        return t

    return change


def archive(kind: str, build: Callable[[Path, Path], bytes]):
    """Serve bytes built from the template as an archive on the corpus' http server."""

    def make(template: Path, tmp: Path, url: str) -> str:
        name = f"{tmp.name}.{kind}"
        (Path(url.split("|", 1)[1]) / name).write_bytes(build(template, tmp))
        return f"{url.split('|', 1)[0]}/{name}"

    return make


def zip_bomb(template: Path, _tmp: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(template / "adapter_config.json", "adapter_config.json")
        # 64 MiB of zeros deflates to ~64 KiB: only counting what inflates stops it.
        with z.open("adapter_model.safetensors", "w", force_zip64=True) as f:
            for _ in range(64):
                f.write(bytes(1 << 20))
    return buf.getvalue()


def tar_escape(template: Path, _tmp: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(template / "adapter_model.safetensors", "x/adapter_model.safetensors")
        link = tarfile.TarInfo("x/adapter_config.json")  # a link to a file of the host
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        evil = tarfile.TarInfo("../../escape.txt")
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
    return buf.getvalue()


def tar_members(_template: Path, _tmp: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(10_050):
            tar.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    return buf.getvalue()


INVALID = AdapterErrorCode.INVALID_ADAPTER.value
INCOMPATIBLE = AdapterErrorCode.INCOMPATIBLE.value
deep = "[" * 100_000 + "]" * 100_000

CORPUS = [
    Case("alpha-nan", raw_field("lora_alpha", "NaN"), 422, INVALID, ("NaN",)),
    Case("r-infinity", raw_field("r", "Infinity"), 422, INVALID, ("Infinity",)),
    Case("alpha-neg-inf", raw_field("lora_alpha", "-Infinity"), 422, INVALID, ("Infinity",)),
    Case("alpha-1e300", config_change(lora_alpha=1e300), 422, INVALID, ("lora_alpha",)),
    Case("alpha-string", config_change(lora_alpha="16"), 422, INVALID, ("lora_alpha",)),
    Case("alpha-zero", config_change(lora_alpha=0), 422, INVALID, ("lora_alpha",)),
    Case("alpha-bool", config_change(lora_alpha=True), 422, INVALID, ("lora_alpha",)),
    Case("r-fraction", config_change(r=8.5), 422, INVALID, ("r",)),
    Case("r-huge", config_change(r=10**30), 422, INVALID, ("r",)),
    Case("r-null", config_change(r=None), 422, INVALID, ("r",)),
    Case("r-mismatch", config_change(r=4), 422, INVALID, ("rank 4",)),
    Case("rank-pattern-list", config_change(rank_pattern=["q_proj"]), 422, INVALID, ("rank_pattern",)),
    Case("rank-pattern-null-value", config_change(rank_pattern={"q_proj": None}), 422, INVALID, ("rank_pattern",)),
    Case("alpha-pattern-nan", raw_field("alpha_pattern", '{"q_proj": NaN}'), 422, INVALID, ("NaN",)),
    Case("alpha-pattern-string", config_change(alpha_pattern={"q_proj": "x"}), 422, INVALID, ("alpha_pattern",)),
    Case("pattern-bad-regex", config_change(rank_pattern={"q_proj(": 8}), 422, INVALID, ("rank_pattern", "regular expression")),
    Case("pattern-redos-matches", config_change(alpha_pattern={"(a|aa)*q_proj": 1e9}), 422, INVALID, ("alpha_pattern",)),
    Case("pattern-backreference", config_change(rank_pattern={"(q)\\1_proj": 8}), 422, INVALID, ("rank_pattern", "not supported")),
    Case("pattern-lookahead", config_change(rank_pattern={"(?=q)q_proj": 8}), 422, INVALID, ("rank_pattern", "not supported")),
    Case("pattern-huge-repeat", config_change(rank_pattern={"(q{1,9999}){1,9999}": 8}), 422, INVALID, ("rank_pattern",)),
    Case("pattern-long-key", config_change(rank_pattern={"a" * 5000: 8}), 422, INVALID, ("rank_pattern",)),
    Case("base-name-number", config_change(base_model_name_or_path=5), 422, INVALID, ("base_model_name_or_path",)),
    Case("base-name-other", config_change(base_model_name_or_path="org/other-7b"), 422, INCOMPATIBLE, ("base_model_name_or_path",)),
    Case("peft-type-number", config_change(peft_type=5), 422, INVALID, ("peft_type",)),
    Case("use-rslora-string", config_change(use_rslora="yes"), 422, INVALID, ("use_rslora",)),
    Case("dora", config_change(use_dora=True), 422, INVALID, ("use_dora",)),
    Case("config-list", config_text(lambda c: "[1, 2]"), 422, INVALID, ("JSON object",)),
    Case("config-deep", config_text(lambda c: deep), 422, INVALID, ("adapter_config.json",)),
    Case("config-huge", config_text(lambda c: json.dumps(c | {"pad": "x" * (2 << 20)})), 422, INVALID, ("bytes",)),
    Case("config-not-utf8", lambda tpl, tmp, _u: (_copy(tpl, tmp) / "adapter_config.json").write_bytes(b"\xff{}") and str(tmp), 422, INVALID, ("JSON",)),
    Case("weights-nan-a", weights(poke(first_a, float("nan"))), 422, INVALID, ("lora_A", "NaN")),
    Case("weights-inf-b", weights(poke(first_b, float("inf"))), 422, INVALID, ("lora_B", "infinite")),
    Case("weights-wide-a", weights(reshape(first_a, 0, 3)), 422, INCOMPATIBLE, ("lora_A",)),
    Case("weights-tall-b", weights(reshape(first_b, 5, 0)), 422, INCOMPATIBLE, ("lora_B",)),
    Case("weights-rank-disagree", weights(reshape(first_b, 0, 1)), 422, INVALID, ("rank",)),
    Case("weights-int", weights(lambda t: {k: v.to(torch.int32) for k, v in t.items()}), 422, INVALID, ("floating point",)),
    Case("weights-3d", weights(lambda t: t | {first_a(t): t[first_a(t)][None]}), 422, INVALID, ("2-D",)),
    Case("weights-empty", weights(lambda t: t | {first_a(t): torch.zeros(0, 64)}), 422, INVALID, ("not empty",)),
    Case("weights-missing-b", weights(lambda t: {k: v for k, v in t.items() if k != first_b(t)}), 422, INVALID, ("lora_A and lora_B",)),
    Case("weights-odd-key", weights(lambda t: t | {"model.evil": torch.zeros(2, 2)}), 422, INVALID, ("model.evil",)),
    Case("weights-embedding", weights(lambda t: t | {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 4)}), 422, INVALID, ("embeddings",)),
    Case("weights-garbage", lambda tpl, tmp, _u: (_copy(tpl, tmp) / "adapter_model.safetensors").write_bytes(b"\x00" * 64) and str(tmp), 422, INVALID, ("safetensors",)),
    Case("weights-pickle", lambda tpl, tmp, _u: (_copy(tpl, tmp) / "adapter_model.safetensors").rename(tmp / "adapter_model.bin") and str(tmp), 422, INVALID, ("pickle",)),
    Case("zip-bomb", archive("zip", zip_bomb), 422, "source_too_large", ("max-adapter-bytes",)),
    Case("tar-escape-and-link", archive("tar.gz", tar_escape), 422, INVALID, ("adapter_config.json",)),
    Case("tar-many-members", archive("tar.gz", tar_members), 422, INVALID, ("members",)),
    Case("archive-garbage", archive("zip", lambda *_: b"PK\x03\x04 not really"), 422, INVALID, ("archive",)),
    Case("link-local", lambda *_: "http://169.254.169.254/latest/adapter.zip", 400, "invalid_source", ("link-local",)),
    Case("metadata-v6", lambda *_: "http://[fd00:ec2::254]/adapter.zip", 400, "invalid_source", ("metadata",)),
    Case("http-userinfo", lambda _t, _d, url: url.split("|")[0].replace("//", "//u:hunter2@") + "/x.zip", 400, "invalid_source", ("in clear",)),
    Case("no-scheme", lambda *_: "gs://bucket/x", 400, "invalid_source", ("scheme",)),
    Case("relative", lambda *_: "file://relative/x", 400, "invalid_source", ("absolute",)),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    tmp = tmp_path_factory.mktemp("hostile")
    config = make_config(
        base,
        tmp,
        adapters={"poet": str(adapters["poet"])},
        max_adapter_bytes=MAX_ADAPTER_BYTES,
        fetch_timeout_s=3.0,
        max_concurrent_fetches=2,
        max_running=8,
    )
    with RunningServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    server = serve_directory(root)
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Neighbour:
    """Requests for an unrelated adapter and the base, run over and over while the corpus
    loads: every answer must be PEFT's, whatever the corpus does."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: dict[str, set[str]] = {"poet": set(), "tiny": set()}
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            for _ in range(2000):  # bounded; the corpus sets stop long before
                if self.stop.is_set():
                    return
                for model in self.answers:
                    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
                    r = client.post(f"{self.url}/v1/completions", json=body)
                    if r.status_code != 200:
                        self.failures.append(f"{model}: {r.status_code} {r.text}")
                    else:
                        self.answers[model].add(r.json()["choices"][0]["text"])

    def __enter__(self) -> Neighbour:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def test_every_hostile_adapter_is_refused_while_a_neighbour_keeps_peft_answers(
    server,
    demo_dir,
    www,
    tmp_path,
    caplog,
):
    base, adapters = demo_dir
    root, url = www
    template = adapters["sql-expert"]
    caplog.set_level(logging.INFO)
    refused = []
    with Neighbour(server.url) as neighbour:
        for case in CORPUS:
            source = case.make(template, tmp_path / case.name, f"{url}|{root}")
            r = httpx.put(
                f"{server.url}/v1/adapters/{case.name}", json={"source": source}, timeout=60
            )
            assert r.headers["content-type"] == "application/json", (case.name, r.text)
            assert r.status_code == case.status, (case.name, r.text)
            if case.status == 201:
                continue
            error = r.json()["error"]
            assert error["code"] == case.code, (case.name, error)
            said = f"{error['message']} {error['param']}"
            assert all(w in said for w in case.words), (case.name, error)
            assert "hunter2" not in said, "a credential was echoed"
            refused.append(case.name)
        wait_for(lambda: all(neighbour.answers.values()), "the neighbour's answers")
    assert not neighbour.failures, neighbour.failures[:3]
    want = {
        "poet": peft_greedy(base, adapters["poet"], [PROMPT], 8)[0],
        "tiny": peft_greedy(base, None, [PROMPT], 8)[0],
    }
    assert neighbour.answers == {m: {t} for m, t in want.items()}
    listed = {a["name"] for a in httpx.get(f"{server.url}/v1/adapters").json()["adapters"]}
    assert not listed & set(refused), "a refused adapter was listed"
    assert not list(tmp_path.parent.rglob("escape.txt"))
    assert "hunter2" not in caplog.text
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_hostile_pattern_key_runs_in_linear_time(server, demo_dir, tmp_path):
    # ((.)*)*X backtracks exponentially in Python's re on a long module name; the server must
    # load the adapter (the key matches nothing) and stay healthy: the test's timeout guards.
    _, adapters = demo_dir
    src = _copy(adapters["sql-expert"], tmp_path / "redos")
    config = json.loads((src / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"((.)*)*X": 16, "(a|a)*(b|b)*(c|c)*$": 16}
    (src / "adapter_config.json").write_text(json.dumps(config))
    r = httpx.put(f"{server.url}/v1/adapters/redos", json={"source": str(src)}, timeout=60)
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{server.url}/v1/adapters/redos").status_code == 200


def test_a_failed_adapter_loads_again_when_put_again(server, demo_dir, monkeypatch):
    _, adapters = demo_dir
    runner = server.runtime.runner
    real_load = runner.load_adapter
    broken = [True]

    def refuse_once(slot, weights):
        if broken[0] and weights.rank == 16:  # support-bot
            raise RuntimeError("simulated copy failure")
        return real_load(slot, weights)

    monkeypatch.setattr(runner, "load_adapter", refuse_once)
    body = {"source": str(adapters["support-bot"])}
    url = f"{server.url}/v1/adapters/support-bot"
    assert httpx.put(url, json=body).status_code == 201
    wait_for(lambda: httpx.get(url).json()["state"] == "failed", "the copy to fail")
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "support-bot", "prompt": "hi"})
    assert r.status_code == 503 and "again" in r.json()["error"]["message"], r.text
    broken[0] = False
    r = httpx.put(url, json=body)
    assert r.status_code == 201 and r.json()["state"] == "loaded", r.text
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "support-bot", "prompt": "hi", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    httpx.delete(url)


class Drip(http.server.BaseHTTPRequestHandler):
    """Announces a large body, then sends a byte at a time until the client gives up."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000):  # bounded: 1000 bytes at most
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return
            if self.server.stop.wait(0.05):  # type: ignore[attr-defined]
                return


@pytest.fixture
def drip():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.stop = threading.Event()  # type: ignore[attr-defined]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.stop.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def test_slow_sources_are_bounded_in_time_number_and_cancellable(server, demo_dir, drip):
    _, adapters = demo_dir
    results: dict[str, httpx.Response] = {}

    def put(name: str, source: str) -> None:
        results[name] = httpx.put(
            f"{server.url}/v1/adapters/{name}", json={"source": source}, timeout=60
        )

    slow = [
        threading.Thread(target=put, args=(f"drip{i}", f"{drip}/a{i}.zip"), daemon=True)
        for i in range(2)
    ]
    for t in slow:
        t.start()
    wait_for(lambda: len(server.runtime.adapters.loading_now()) == 2, "two slow fetches in flight")
    put("drip2", f"{drip}/a2.zip")  # over --max-concurrent-fetches 2
    assert results["drip2"].status_code == 429, results["drip2"].text
    assert results["drip2"].json()["error"]["code"] == "too_many_fetches"
    put("local", str(adapters["sql-expert"]))  # a local load is no fetch: never wedged
    assert results["local"].status_code == 201, results["local"].text
    assert httpx.delete(f"{server.url}/v1/adapters/drip0").status_code == 200
    for t in slow:
        t.join(timeout=30)
    assert results["drip0"].status_code == 409, results["drip0"].text  # the DELETE stopped it
    assert results["drip1"].status_code == 504, results["drip1"].text  # --fetch-timeout 3 s
    assert results["drip1"].json()["error"]["code"] == "source_timeout"
    assert not server.runtime.adapters.loading_now()
    httpx.delete(f"{server.url}/v1/adapters/local")


def test_a_full_disk_is_a_json_507(server, www, monkeypatch):
    import errno
    import tempfile

    root, url = www
    (root / "full.zip").write_bytes(b"")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", no_space)
    r = httpx.put(f"{server.url}/v1/adapters/full", json={"source": f"{url}/full.zip"})
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text


def test_sources_are_redacted_in_models_admin_and_logs(server, demo_dir, www, caplog):
    _, adapters = demo_dir
    root, url = www
    caplog.set_level(logging.INFO)
    with zipfile.ZipFile(root / "signed.zip", "w") as z:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            z.write(adapters["sql-expert"] / name, name)
    source = f"{url}/signed.zip?X-Amz-Signature=hunter2&X-Amz-Credential=AKIA"
    r = httpx.put(f"{server.url}/v1/adapters/signed", json={"source": source})
    assert r.status_code == 201, r.text
    shown = f"{url}/signed.zip?***"
    assert r.json()["source"] == shown
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert next(m for m in models if m["id"] == "signed")["root"] == shown
    assert "hunter2" not in httpx.get(f"{server.url}/v1/adapters").text
    assert "hunter2" not in caplog.text and "AKIA" not in caplog.text
    httpx.delete(f"{server.url}/v1/adapters/signed")


def test_link_local_is_refused_before_any_connection_unless_allowed(monkeypatch):
    from loraplane.runtime.adapters.guard import FetchLimits, Guard, parse_networks

    dialed = []
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        dialed.append(host)
        if host == "metadata.internal":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    guard = Guard(FetchLimits(), "x")
    with pytest.raises(Exception, match="link-local"):
        guard.check_host("http://metadata.internal/a.zip")  # a name, not only a literal
    allowed = FetchLimits(allow=parse_networks(["169.254.169.254/32"]))
    Guard(allowed, "x").check_host("http://metadata.internal/a.zip")
    assert FetchLimits().denies("::ffff:169.254.169.254")  # v4-mapped v6 is the same host
    assert not FetchLimits().denies("127.0.0.1")


def test_every_refusal_kind_is_a_wire_error_code():
    # The operator turns error.code into conditions: a code it cannot parse is a code lost.
    from loraplane.runtime.adapters import errors

    kinds = {
        cls.kind
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.AdapterError)
    }
    assert kinds <= {c.value for c in AdapterErrorCode}, kinds - set(AdapterErrorCode)
