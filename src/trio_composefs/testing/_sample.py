"""A small built-in sample image, made deterministically, for demos and tests.

Three layers exercise what matters to composefs: files just under, at and over
the 64-byte inline limit, a large file, hard links, symlinks, a long PAX path,
a whiteout and an opaque directory. Every byte is fixed (names, modes, owners,
mtimes, contents), so the layers' diff_ids never change.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

import attrs

__all__ = ["SampleLayer", "sample_layers"]

_MTIME = 1_700_000_000


@attrs.frozen
class SampleLayer:
    """One layer of the sample image: its tar bytes and their sha256 diff_id."""

    description: str
    tar: bytes

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()


def _content(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


class _Layer:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(  # noqa: SIM115 - closed in done()
            fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT
        )

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = _MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def link(self, name: str, target: str, *, hard: bool = False) -> None:
        info = self._info(name, tarfile.LNKTYPE if hard else tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)

    def done(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def sample_layers() -> list[SampleLayer]:
    """The sample image's layers, bottom first."""
    base = _Layer()
    for d in ("usr", "usr/bin", "usr/lib", "usr/share", "usr/share/doc", "etc", "var", "run"):
        base.dir(d)
    base.file("usr/bin/hello", b"#!/bin/sh\necho 'hello from the trio-composefs sample'\n", 0o755)
    base.file("usr/share/doc/63-bytes", _content("63", 63))
    base.file("usr/share/doc/64-bytes", _content("64", 64))
    base.file("usr/share/doc/65-bytes", _content("65", 65))
    base.file("usr/lib/big.bin", _content("big", 3 * 1024 * 1024 + 17))
    base.file("usr/lib/libsample.so.1.0", _content("lib", 200 * 1024), 0o755)
    base.link("usr/lib/libsample.so.1", "libsample.so.1.0")
    base.link("usr/bin/hello-again", "usr/bin/hello", hard=True)
    base.file("etc/os-release", b'NAME="trio-composefs sample"\nID=sample\nVERSION_ID=1\n')
    base.dir("etc/old")
    base.file("etc/old/config", _content("old-config", 4096))
    base.file("usr/share/doc/obsolete.txt", _content("obsolete", 1000))
    long_dir = "usr/share/doc/" + "a-rather-long-directory-name-" * 4
    base.dir(long_dir)
    base.file(long_dir + "/" + "and-a-long-file-name-" * 6 + ".txt", _content("long", 300))

    update = _Layer()
    update.dir("usr")
    update.dir("usr/share")
    update.dir("usr/share/doc")
    update.file("usr/share/doc/.wh.obsolete.txt", b"")  # whiteout: removes obsolete.txt
    update.dir("etc")
    update.dir("etc/old")
    update.file("etc/old/.wh..wh..opq", b"")  # opaque: hides the lower etc/old
    update.file("etc/old/config", _content("new-config", 5000))
    update.file("usr/lib/libsample.so.1.0", _content("lib", 200 * 1024), 0o755)  # same content

    app = _Layer()
    app.dir("opt")
    app.dir("opt/app")
    app.file("opt/app/data.bin", _content("data", 1 << 20))
    app.file("opt/app/README", b"An application layer on top of the sample base.\n")
    app.link("opt/app/hello", "/usr/bin/hello")

    return [
        SampleLayer("base: /usr, /etc, small and large files, links", base.done()),
        SampleLayer("update: a whiteout, an opaque directory, a duplicate file", update.done()),
        SampleLayer("app: /opt/app", app.done()),
    ]
