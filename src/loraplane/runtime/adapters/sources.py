"""Fetch an adapter (or a base model) from a source URI into a local directory.

Schemes: a plain path or file:///abs, pvc://claim/path (under a mount root), hf://org/name[@rev]
(huggingface_hub), s3://bucket/prefix (fsspec/s3fs), https:// (an archive or a directory URL
holding the files). Remote copies land in the cache dir keyed by source, revision and expected
sha256, written to a temporary directory first and renamed into place, so a crash never leaves
half a copy; a copy that fails verification is dropped (Fetcher.forget), so a retry downloads.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraplane.api.wire import CREDENTIAL_KEYS, RUNTIME_ADAPTER_SCHEMES
from loraplane.runtime.adapters.errors import InvalidSource, SourceNotFound, SourceUnreachable

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
    http_timeout_s: float = 60.0

    def fetch(
        self,
        source: str,
        revision: str | None = None,
        credentials: dict[str, str] | None = None,
        model: bool = False,
        sha256: str | None = None,
    ) -> Path:
        """A local directory with the files of source; credentials are a secretRef's data.

        A remote copy is cached per source, revision and expected sha256: new content behind
        the same URL, announced by its new sha256, is downloaded again.
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
        if scheme == "hf":
            return self._hf(rest, revision, creds.get("HF_TOKEN") or self.hf_token, model)
        if scheme == "s3":
            options = s3_options(creds)
            return self._cached(
                source, revision, sha256, lambda d: self._s3(rest, d, model, options)
            )
        token = creds.get("BEARER_TOKEN")
        return self._cached(source, revision, sha256, lambda d: self._https(source, d, token))

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
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".partial-"))
        try:
            fill(tmp)
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # another fetch of the same source may have won the race
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _hf(self, rest: str, revision: str | None, token: str | None, model: bool) -> Path:
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
            )
        except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: offline
            raise SourceUnreachable(f"hf://{rest} could not be downloaded: {e}") from e
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
            raise SourceNotFound(f"hf://{rest}: {e}") from e
        except (HfHubHTTPError, OSError) as e:
            raise SourceUnreachable(f"hf://{rest} could not be downloaded: {e}") from e
        return Path(path)

    def _s3(self, rest: str, dest: Path, model: bool, options: dict[str, Any]) -> None:
        fs = self._filesystem("s3", options)
        prefix = rest.rstrip("/")
        try:
            if model:
                names = [Path(p).name for p in fs.ls(prefix, detail=False)]
                wanted = [n for n in names if any(Path(n).match(p) for p in MODEL_PATTERNS)]
            else:
                wanted = list(ADAPTER_FILES)
            for name in wanted:
                fs.get(f"{prefix}/{name}", str(dest / name))
        except FileNotFoundError as e:
            raise SourceNotFound(f"s3://{rest}: {e} not found") from e
        except PermissionError as e:
            raise SourceUnreachable(f"s3://{rest}: access denied ({e}); check the secret") from e
        except Exception as e:  # botocore's connection errors are not OSErrors
            raise SourceUnreachable(f"s3://{rest} could not be read: {e}") from e

    def _filesystem(self, protocol: str, options: dict[str, Any]) -> Any:
        if self.filesystem is not None:
            return self.filesystem(protocol, **options)
        import fsspec

        # skip_instance_cache: an instance made with one adapter's keys must not serve another.
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)

    def _https(self, url: str, dest: Path, token: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        path = urlparse(url).path
        with httpx.Client(
            timeout=self.http_timeout_s, follow_redirects=True, headers=headers
        ) as client:
            if path.endswith(ARCHIVES):
                archive = dest / ("archive.zip" if path.endswith(".zip") else "archive.tar")
                _download(client, url, archive)
                _extract(archive, dest)
                archive.unlink()
            else:
                for name in ADAPTER_FILES:
                    _download(client, f"{url.rstrip('/')}/{name}", dest / name)


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


def _download(client: Any, url: str, out: Path) -> None:
    import httpx

    try:
        with client.stream("GET", url) as response:
            if response.status_code == 404:
                raise SourceNotFound(f"{url} answered 404")
            if response.status_code in (401, 403):
                raise SourceUnreachable(f"{url} answered {response.status_code}: check the token")
            response.raise_for_status()
            with out.open("wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
    except httpx.HTTPError as e:
        raise SourceUnreachable(f"{url} could not be downloaded: {e}") from e


def _extract(archive: Path, dest: Path) -> None:
    """Unpack only the adapter files, wherever they sit, refusing links and path tricks."""
    found: dict[str, bytes] = {}
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    name = Path(info.filename).name
                    if name in ADAPTER_FILES and not info.is_dir():
                        found[name] = z.read(info)
        else:
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    name = Path(member.name).name
                    if name in ADAPTER_FILES and member.isfile():
                        f = t.extractfile(member)
                        assert f is not None
                        found[name] = f.read()
    except (tarfile.TarError, zipfile.BadZipFile) as e:
        raise SourceNotFound(f"{archive.name} is not a readable archive: {e}") from e
    for name, data in found.items():
        (dest / name).write_bytes(data)
