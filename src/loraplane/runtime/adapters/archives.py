"""Unpack the two adapter files from a .zip or .tar(.gz) without trusting the archive.

Only adapter_config.json and adapter_model.safetensors are taken, wherever they sit; links,
devices and path tricks are never written. Every byte decompressed counts against the fetch's
Guard, so a small bomb stops at --max-adapter-bytes instead of filling memory or the disk.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from loraplane.runtime.adapters.errors import InvalidAdapter
from loraplane.runtime.adapters.guard import Guard

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_MEMBERS = 10_000  # a tar of millions of empty files costs time without any bytes


def extract(archive: Path, dest: Path, guard: Guard) -> None:
    try:
        if archive.suffix == ".zip":
            _unzip(archive, dest, guard)
        else:
            _untar(archive, dest, guard)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the disk, not the archive: the caller maps it
        raise InvalidAdapter(f"{archive.name} is not a readable archive: {e}") from e


def _unzip(archive: Path, dest: Path, guard: Guard) -> None:
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        if len(members) > MAX_MEMBERS:
            raise InvalidAdapter(f"{archive.name} has more than {MAX_MEMBERS} members")
        for info in members:
            name = PurePosixPath(info.filename).name
            if name in ADAPTER_FILES and not info.is_dir():
                # The sizes in a zip's directory are the author's claim: count what inflates.
                with z.open(info) as src, (dest / name).open("wb") as out:
                    _copy(src, out, guard)


def _untar(archive: Path, dest: Path, guard: Guard) -> None:
    # Stream mode reads members in order without keeping a list of them all.
    with tarfile.open(archive, mode="r|*") as t:
        for count, member in enumerate(t, 1):
            if count > MAX_MEMBERS:
                raise InvalidAdapter(f"{archive.name} has more than {MAX_MEMBERS} members")
            guard.count(member.size if member.isfile() else 0)
            name = PurePosixPath(member.name).name
            if name in ADAPTER_FILES and member.isfile():
                src = t.extractfile(member)
                assert src is not None
                guard.used -= member.size  # counted once, as it is read
                with (dest / name).open("wb") as out:
                    _copy(src, out, guard)


def _copy(src, out, guard: Guard) -> None:
    while chunk := src.read(1 << 20):
        guard.count(len(chunk))
        out.write(chunk)
