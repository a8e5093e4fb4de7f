"""Fetch an adapter (or a base model) from a source URI into a local directory.

Schemes: a plain path or file:///abs, pvc://claim/path (under a mount root), hf://org/name[@rev]
(huggingface_hub), s3://bucket/prefix (fsspec/s3fs), https:// (an archive or a directory URL
holding the files). Remote copies land in the cache dir keyed by source, revision and expected
sha256, written to a temporary directory first and renamed into place, so a crash never leaves
half a copy; a copy that fails verification is dropped (Fetcher.forget), so a retry downloads.
Every remote fetch runs under a Guard (guard.py): bounded bytes and time, cancellable, and
never to a link-local or metadata address; at most --max-concurrent-fetches run at once.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraplane.api.wire import CREDENTIAL_KEYS, RUNTIME_ADAPTER_SCHEMES, redact_source
from loraplane.runtime.adapters.archives import extract
from loraplane.runtime.adapters.errors import (
    AdapterError,
    InvalidSource,
    SourceNotFound,
    SourceUnreachable,
    TooManyFetches,
)
from loraplane.runtime.adapters.guard import (
    FetchLimits,
    Guard,
    redact_client_logs,
    storage_error,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model")
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
SCHEMES = RUNTIME_ADAPTER_SCHEMES


@dataclass
class Fetcher:
    cache_dir: Path
    pvc_root: Path
    hf_token: str | None = None
    # Injectable for tests: (protocol, **storage options) -> an fsspec filesystem.
    filesystem: Callable[..., Any] | None = None
    limits: FetchLimits = field(default_factory=FetchLimits)
    max_concurrent: int = 4  # remote fetches at once; more are refused with 429
    tls_verify: Any = True  # httpx's verify: True (system CAs) or an ssl.SSLContext

    def __post_init__(self) -> None:
        self._permits = threading.BoundedSemaphore(self.max_concurrent)
        redact_client_logs()

    def fetch(
        self,
        source: str,
        revision: str | None = None,
        credentials: dict[str, str] | None = None,
        model: bool = False,
        sha256: str | None = None,
        guard: Guard | None = None,
    ) -> Path:
        """A local directory with the files of source; credentials are a secretRef's data.

        A remote copy is cached per source, revision and expected sha256: new content behind
        the same URL, announced by its new sha256, is downloaded again. guard bounds and
        cancels the fetch (a fresh one with self.limits when not given).
        """
        creds = credentials or {}
        unknown = sorted(set(creds) - set(CREDENTIAL_KEYS))
        if unknown:
            raise InvalidSource(f"unknown credential keys {unknown}; known: {CREDENTIAL_KEYS}")
        scheme, rest = split_source(source)
        if scheme == "file":
            return self._local(Path(rest), source)
        if scheme == "pvc":
            return self._pvc(rest, source)
        userinfo = "@" in rest.split("/", 1)[0]  # http://user:password@host
        if scheme == "http" and (creds or userinfo):
            raise InvalidSource(
                f"source {redact_source(source)} is plain http://, and credentials would travel "
                "in clear; use https://"
            )
        guard = guard or Guard(self.limits, source)
        if not self._permits.acquire(blocking=False):
            raise TooManyFetches(
                f"{self.max_concurrent} adapter fetches are running (--max-concurrent-fetches); "
                "retry later"
            )
        try:
            if scheme == "hf":
                token = creds.get("HF_TOKEN") or self.hf_token
                return self._hf(rest, revision, token, model, guard)
            if scheme == "s3":
                options = s3_options(creds)
                return self._cached(
                    source, revision, sha256, lambda d: self._s3(rest, d, model, options, guard)
                )
            token = creds.get("BEARER_TOKEN")
            return self._cached(
                source, revision, sha256, lambda d: self._https(source, d, token, guard)
            )
        finally:
            self._permits.release()

    def _local(self, path: Path, source: str) -> Path:
        if not path.is_absolute():
            raise InvalidSource(f"source {source!r} must be an absolute path (file:///abs/path)")
        if not path.is_dir():
            raise SourceNotFound(f"source {source!r}: {path} is not a directory")
        return path

    def _pvc(self, rest: str, source: str) -> Path:
        root = self.pvc_root.resolve()
        path = (root / rest).resolve()
        if not path.is_relative_to(root) or not rest.strip("/"):
            raise InvalidSource(f"source {source!r} must name pvc://claim/path inside the claim")
        return self._local(path, source)

    def forget(self, local: Path) -> None:
        """Drop a cached remote copy that failed verification, so a retry downloads again."""
        if local.parent.resolve() == (self.cache_dir / "sources").resolve():
            shutil.rmtree(local, ignore_errors=True)

    def _cached(
        self,
        source: str,
        revision: str | None,
        sha256: str | None,
        fill: Callable[[Path], None],
    ) -> Path:
        name = f"{source}@{revision or ''}" + (f"#{sha256}" if sha256 else "")
        key = hashlib.sha256(name.encode()).hexdigest()[:24]
        final = self.cache_dir / "sources" / key
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".partial-"))
        except OSError as e:
            raise storage_error(e, source) or e from e
        try:
            fill(tmp)
            tmp.rename(final)
        except OSError as e:
            if not final.is_dir():  # another fetch of the same source may have won the race
                raise storage_error(e, source) or e from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _hf(
        self, rest: str, revision: str | None, token: str | None, model: bool, guard: Guard
    ) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo_id, _, at = rest.partition("@")
        if at and revision and at != revision:
            raise InvalidSource(f"hf://{rest} names revision {at!r} but revision is {revision!r}")
        if repo_id.count("/") > 1 or not repo_id.strip("/"):
            raise InvalidSource(f"hf://{rest} must be hf://org/name[@revision]")
        try:
            path = snapshot_download(
                repo_id=repo_id,
                revision=at or revision or None,
                cache_dir=str(self.cache_dir / "hf"),
                token=token,
                allow_patterns=list(MODEL_PATTERNS if model else ADAPTER_FILES),
                etag_timeout=min(guard.limits.read_timeout_s, 10.0),
            )
        except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: offline
            raise SourceUnreachable(f"hf://{rest} could not be downloaded: {e}") from e
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
            raise SourceNotFound(f"hf://{rest}: {e}") from e
        except OSError as e:
            raise storage_error(e, f"hf://{rest}") or SourceUnreachable(
                f"hf://{rest} could not be downloaded: {e}"
            ) from e
        except HfHubHTTPError as e:
            raise SourceUnreachable(f"hf://{rest} could not be downloaded: {e}") from e
        # huggingface_hub cannot be stopped mid-file; the size is checked once it is done.
        if not model:
            for name in ADAPTER_FILES:
                file = Path(path) / name
                if file.is_file():
                    guard.count(file.stat().st_size)
        return Path(path)

    def _s3(
        self, rest: str, dest: Path, model: bool, options: dict[str, Any], guard: Guard
    ) -> None:
        fs = self._filesystem("s3", options)
        prefix = rest.rstrip("/")
        try:
            if model:
                names = [Path(p).name for p in fs.ls(prefix, detail=False)]
                wanted = [n for n in names if any(Path(n).match(p) for p in MODEL_PATTERNS)]
            else:
                wanted = list(ADAPTER_FILES)
            for name in wanted:
                with fs.open(f"{prefix}/{name}", "rb") as src, (dest / name).open("wb") as out:
                    copy_bounded(src.read, out, guard)
        except AdapterError:
            raise
        except FileNotFoundError as e:
            raise SourceNotFound(f"s3://{rest}: {e} not found") from e
        except PermissionError as e:
            raise SourceUnreachable(f"s3://{rest}: access denied ({e}); check the secret") from e
        except OSError as e:
            raise storage_error(e, f"s3://{rest}") or SourceUnreachable(
                f"s3://{rest} could not be read: {e}"
            ) from e
        except Exception as e:  # botocore's connection errors are not OSErrors
            raise SourceUnreachable(f"s3://{rest} could not be read: {e}") from e

    def _filesystem(self, protocol: str, options: dict[str, Any]) -> Any:
        if self.filesystem is not None:
            return self.filesystem(protocol, **options)
        import fsspec

        # skip_instance_cache: an instance made with one adapter's keys must not serve another.
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)

    def _https(self, url: str, dest: Path, token: str | None, guard: Guard) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(guard.limits.read_timeout_s, connect=10.0)

        def check(request: httpx.Request) -> None:
            guard.check_host(str(request.url))  # the first URL and every redirect
            if token and request.url.scheme != "https":
                raise InvalidSource(
                    f"{redact_source(str(request.url))}: a redirect to plain http:// would "
                    "send the bearer token in clear"
                )

        with httpx.Client(
            timeout=timeout,
            follow_redirects=True,
            max_redirects=5,
            verify=self.tls_verify,
            headers=headers,
            event_hooks={"request": [check]},
        ) as client:
            path = urlparse(url).path
            if path.endswith(ARCHIVES):
                archive = dest / ("archive.zip" if path.endswith(".zip") else "archive.tar")
                _download(client, url, archive, guard)
                # The archive's own bytes count against the limit too.
                extract(archive, dest, guard)
                archive.unlink()
            else:
                for name in ADAPTER_FILES:
                    _download(client, f"{url.rstrip('/')}/{name}", dest / name, guard)


def s3_options(creds: dict[str, str]) -> dict[str, Any]:
    """s3fs storage options from secret keys; empty means s3fs's own chain (env, IAM role)."""
    options: dict[str, Any] = {}
    if "AWS_ACCESS_KEY_ID" in creds:
        options["key"] = creds["AWS_ACCESS_KEY_ID"]
        options["secret"] = creds.get("AWS_SECRET_ACCESS_KEY")
    if "AWS_SESSION_TOKEN" in creds:
        options["token"] = creds["AWS_SESSION_TOKEN"]
    if "AWS_ENDPOINT_URL" in creds:
        options["endpoint_url"] = creds["AWS_ENDPOINT_URL"]
    if "AWS_REGION" in creds:
        options["client_kwargs"] = {"region_name": creds["AWS_REGION"]}
    return options


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_source(source: str) -> tuple[str, str]:
    if source.startswith("/"):
        return "file", source
    scheme, sep, rest = source.partition("://")
    if not sep or scheme not in SCHEMES:
        raise InvalidSource(
            f"source {source!r} has no supported scheme; use one of "
            f"{', '.join(s + '://' for s in SCHEMES)} or an absolute path"
        )
    if scheme == "file":
        return scheme, "/" + rest.lstrip("/") if rest.startswith("/") else rest
    return scheme, rest


def copy_bounded(read: Callable[[int], bytes], out: Any, guard: Guard) -> None:
    """Copy a stream in 1 MiB reads, counting every byte against guard."""
    while chunk := read(1 << 20):
        guard.count(len(chunk))
        out.write(chunk)


def _download(client: Any, url: str, out: Path, guard: Guard) -> None:
    import httpx

    shown = redact_source(url)
    try:
        with client.stream("GET", url) as response:
            if response.status_code == 404:
                raise SourceNotFound(f"{shown} answered 404")
            if response.status_code in (401, 403):
                raise SourceUnreachable(f"{shown} answered {response.status_code}: check the token")
            response.raise_for_status()
            declared = response.headers.get("content-length", "")
            if declared.isdigit():
                guard.count(int(declared))  # refused before a byte is read
                guard.used -= int(declared)
            with out.open("wb") as f:
                # Without a chunk size each network read is yielded as it comes: a slow drip
                # is checked against the deadline at every read, not once per MiB.
                for chunk in response.iter_bytes():
                    guard.count(len(chunk))
                    f.write(chunk)
    except httpx.HTTPError as e:
        why = str(e).replace(url, shown) or type(e).__name__
        raise SourceUnreachable(f"{shown} could not be downloaded: {why}") from e
    except OSError as e:
        raise storage_error(e, url) or SourceUnreachable(f"{shown}: {e}") from e
