"""Any other transport (``docker://``, ``containers-storage:``, ``dir:``...) through skopeo.

:class:`SkopeoSource` runs ``skopeo copy SOURCE dir:TMP`` once, when the
manifest is first resolved, into a private temporary directory (by default
under the directory the caller names, e.g. inside the repository so that the
copy lives on the same filesystem), then serves the manifest and blobs from
there and removes the directory on exit. The ``dir:`` destination keeps the
manifest and every blob byte for byte as the source stored them (an ``oci:``
destination would recompress uncompressed layers), and holds a single image:
skopeo picks the platform from an image index, so the platform is passed on
with ``--override-os/--override-arch/--override-variant``.

Registry options (TLS verification, credentials) are :class:`SkopeoOptions`,
passed through to skopeo under skopeo's own names. skopeo's failures are sorted
into :class:`~trio_composefs.SourceAuthenticationError` (credentials needed or
refused), :class:`~trio_composefs.SourceNetworkError` (the connection failed or
broke) and :class:`~trio_composefs.DigestMismatchError` (a blob whose bytes do
not match its digest); anything else is an :class:`ImageSourceError`.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress

import attrs
import trio

from ..._errors import (
    ComposefsError,
    DigestMismatchError,
    FormatError,
    SourceAuthenticationError,
    SourceNetworkError,
)
from .._index import parse_json, verify_blob
from .._model import MEDIA_TYPES, Descriptor, ImageSourceError, Platform, ResolvedImage

__all__ = ["SkopeoOptions", "SkopeoProxySource", "SkopeoSource", "find_skopeo"]

_CHUNK = 1 << 20


def find_skopeo(program: str = "skopeo") -> str:
    """The path of the skopeo executable.

    Raises:
        ImageSourceError: skopeo is not installed (or not on ``PATH``).
    """
    found = shutil.which(program)
    if found is None:
        raise ImageSourceError(
            f"{program!r} is not installed (or not on PATH): it is needed for image"
            " transports other than oci:, oci-archive: and docker-archive:"
            " (install skopeo, or save the image with 'skopeo copy ... oci-archive:FILE')"
        )
    return found


@attrs.frozen
class SkopeoOptions:
    """How skopeo reaches a registry: its own options, passed through unchanged.

    Args:
        tls_verify: skopeo's ``--tls-verify``: ``False`` for a registry served
            over plain HTTP or with a certificate that cannot be verified (a
            local test registry); ``None`` keeps skopeo's default (verify, and
            use ``registries.conf``).
        authfile: skopeo's ``--authfile``: a ``containers-auth.json(5)`` file, as
            written by ``skopeo login`` or ``podman login`` (default: skopeo's,
            ``${XDG_RUNTIME_DIR}/containers/auth.json``).
        creds: skopeo's ``--creds``, ``USERNAME[:PASSWORD]``. It appears in the
            process list while skopeo runs: prefer ``authfile``.
    """

    tls_verify: bool | None = None
    authfile: str | None = None
    creds: str | None = None

    def proxy_args(self) -> list[str]:
        """The options of ``skopeo experimental-image-proxy`` (and ``skopeo inspect``)."""
        return self._args("--")

    def copy_args(self) -> list[str]:
        """The same options for the source side of ``skopeo copy`` (``--src-...``)."""
        return self._args("--src-")

    def _args(self, prefix: str) -> list[str]:
        args = []
        if self.tls_verify is not None:
            args.append(f"{prefix}tls-verify={'true' if self.tls_verify else 'false'}")
        if self.authfile is not None:
            args += [f"{prefix}authfile", self.authfile]
        if self.creds is not None:
            args += [f"{prefix}creds", self.creds]
        return args


#: Fragments of skopeo's (Go's) messages, and the error each means.
_AUTH_MARKS = (
    "unauthorized",
    "authentication required",
    "invalid username/password",
    "denied:",
)
_NETWORK_MARKS = (
    "connection refused",
    "connection reset",
    "broken pipe",
    "i/o timeout",
    "no such host",
    "network is unreachable",
    "no route to host",
    "unexpected eof",
    ": eof",
    "tls handshake",
    "server gave http response to https client",
    "dial tcp",
    "timeout awaiting",
    "client.timeout",
)
_DIGEST_MARKS = ("corrupted blob", "digest mismatch", "digests do not match")


def skopeo_error(message: str) -> ImageSourceError | DigestMismatchError:
    """The error for one of skopeo's failure messages, by what it says went wrong."""
    low = message.lower()
    if any(mark in low for mark in _DIGEST_MARKS):
        return DigestMismatchError(f"{message}; nothing was published")
    if any(mark in low for mark in _AUTH_MARKS):
        return SourceAuthenticationError(
            f"{message} (credentials: --authfile FILE or --creds USERNAME[:PASSWORD])"
        )
    if "server gave http response to https client" in low:
        return SourceNetworkError(
            f"{message} (a registry served over plain HTTP needs --tls-verify=false)"
        )
    if any(mark in low for mark in _NETWORK_MARKS):
        return SourceNetworkError(message)
    return ImageSourceError(message)


def _manifest_media_type(data: bytes, *, where: str) -> str:
    obj = parse_json(data, where=where)
    media_type = obj.get("mediaType")
    if isinstance(media_type, str):
        return media_type
    if obj.get("schemaVersion") == 2 and "config" in obj and "layers" in obj:
        return MEDIA_TYPES.OCI_MANIFEST  # mediaType is optional in OCI manifests
    raise ImageSourceError(
        f"{where}: not a schema 2 image manifest (schema 1 images are not supported)"
    )


@attrs.define(eq=False)
class _FileStream:
    """Async iterator over an open file's bytes, one thread hop per chunk."""

    fd: int
    size: int
    pos: int = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.pos >= self.size:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        n = min(_CHUNK, self.size - self.pos)
        data = await trio.to_thread.run_sync(os.pread, self.fd, n, self.pos)
        if not data:
            raise FormatError(f"blob file ends after {self.pos} of {self.size} bytes")
        self.pos += len(data)
        return data


@attrs.define(eq=False)
class SkopeoSource:
    """An :class:`~trio_composefs.oci.ImageSource` for any transport skopeo knows.

    Args:
        reference: the full skopeo reference, e.g. ``docker://quay.io/fedora/fedora:41``.
        workdir: where to make the temporary copy (default: the system's temp dir).
        skopeo: the program to run.
        extra_args: more ``skopeo copy`` options (``--src-cert-dir``...).
        options: TLS verification and credentials (``--src-tls-verify``...).
    """

    reference: str
    workdir: str | None = None
    skopeo: str = "skopeo"
    extra_args: Sequence[str] = ()
    options: SkopeoOptions = attrs.field(factory=SkopeoOptions, kw_only=True)
    description: str = attrs.field(init=False)
    """The reference, as given."""
    _tmp: str | None = attrs.field(default=None, init=False)
    _copied_for: Platform | None = attrs.field(default=None, init=False)
    _manifest: ResolvedImage | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.description = self.reference

    async def __aenter__(self) -> SkopeoSource:
        self.skopeo = find_skopeo(self.skopeo)
        try:
            self._tmp = await trio.to_thread.run_sync(
                lambda: tempfile.mkdtemp(prefix=".skopeo-copy-", dir=self.workdir)
            )
        except OSError as exc:
            raise ImageSourceError(
                f"cannot make a temporary directory in {self.workdir or tempfile.gettempdir()}:"
                f" {exc.strerror}"
            ) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        tmp, self._tmp = self._tmp, None
        self._manifest = self._copied_for = None
        if tmp is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, tmp, True)

    @property
    def _dir(self) -> str:
        if self._tmp is None:
            raise ImageSourceError(f"{self.description}: used outside 'async with'")
        return os.path.join(self._tmp, "image")

    async def _copy(self, platform: Platform) -> None:
        dest = self._dir
        await trio.to_thread.run_sync(lambda: shutil.rmtree(dest, ignore_errors=True))
        command = [self.skopeo, "--override-os", platform.os]
        command += ["--override-arch", platform.architecture]
        if platform.variant:
            command += ["--override-variant", platform.variant]
        command += ["copy", "--quiet", *self.options.copy_args(), *self.extra_args]
        command += [self.reference, f"dir:{dest}"]
        result = await trio.run_process(
            command, stdout=subprocess.DEVNULL, capture_stderr=True, check=False
        )
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip()
            raise skopeo_error(
                f"skopeo could not copy {self.reference}"
                f" (exit status {result.returncode}): {message[-2000:] or 'no message'}"
            )

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """Copy the image (for ``platform``, default the current one) and return its manifest.

        The copy is made once per platform; later calls reuse it.
        """
        want = platform or Platform.current()
        if self._manifest is None or self._copied_for != want:
            self._manifest = None
            await self._copy(want)
            path = os.path.join(self._dir, "manifest.json")
            data = await trio.to_thread.run_sync(_read_file, path, 64 << 20)
            media_type = _manifest_media_type(data, where=f"{self.reference}: manifest")
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            self._manifest = ResolvedImage(data, digest, media_type)
            self._copied_for = want
        return self._manifest

    def _blob_path(self, descriptor: Descriptor) -> str:
        if self._manifest is None:
            raise ImageSourceError(f"{self.description}: call resolve() before reading blobs")
        return os.path.join(self._dir, descriptor.digest.partition(":")[2])

    async def read_blob(self, descriptor: Descriptor, *, max_size: int = 64 << 20) -> bytes:
        """A small blob (the config), whole and checked against its digest."""
        if descriptor.size > max_size:
            raise ImageSourceError(
                f"{self.reference}: blob {descriptor.digest} is {descriptor.size} bytes"
                f" (more than {max_size})"
            )
        path = self._blob_path(descriptor)
        data = await trio.to_thread.run_sync(_read_file, path, max_size + 1)
        return verify_blob(data, descriptor, where=f"{self.reference}: {path}")

    @asynccontextmanager
    async def open_blob(self, descriptor: Descriptor) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a blob's stored bytes in chunks of at most 1 MiB (not checked here)."""
        path = self._blob_path(descriptor)
        fd = await trio.to_thread.run_sync(_open, path)
        try:
            size = os.fstat(fd).st_size
            if size != descriptor.size:
                raise FormatError(
                    f"{path}: blob {descriptor.digest} has {size} bytes,"
                    f" the descriptor says {descriptor.size}"
                )
            yield _FileStream(fd, size)
        finally:
            os.close(fd)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageSourceError(f"{path}: no such blob in the copied image") from None


def _read_file(path: str, limit: int) -> bytes:
    fd = _open(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit)
    finally:
        os.close(fd)
    if len(data) >= limit:
        raise ImageSourceError(f"{path}: larger than {limit - 1} bytes")
    return data


# --------------------------------------------------------------------------- streaming proxy

_PROXY_MAJOR = "0.2."
_MAX_REPLY = 1 << 20


def _take_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


@attrs.define(eq=False)
class _Proxy:
    """A running ``skopeo experimental-image-proxy`` and its request socket.

    One request at a time (the proxy answers in order); a reply may carry the
    read end of a pipe through which the proxy writes the payload, and the
    pipe must then be released with ``FinishPipe``, which also reports errors
    found while writing it (a blob whose digest does not match).
    """

    process: trio.Process
    sock: trio.socket.SocketType
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    out_of_step: bool = False
    """A request was cancelled before its reply came: the next reply would be its."""

    @classmethod
    async def start(cls, skopeo: str, platform: Platform, extra_args: Sequence[str]) -> _Proxy:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [skopeo, "--override-os", platform.os]
        command += ["--override-arch", platform.architecture]
        if platform.variant:
            command += ["--override-variant", platform.variant]
        command += ["experimental-image-proxy", "--sockfd", str(theirs.fileno()), *extra_args]
        try:
            process = await trio.lowlevel.open_process(
                command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        proxy = cls(process, trio.socket.from_stdlib_socket(ours))
        try:
            version, _, _ = await proxy.call("Initialize")
            if not isinstance(version, str) or not version.startswith(_PROXY_MAJOR):
                raise ImageSourceError(f"skopeo's image proxy speaks {version!r}, not 0.2.x")
        except BaseException:
            await proxy.aclose()
            raise
        return proxy

    async def call(self, method: str, *args: object) -> tuple[object, int, int | None]:
        """Send one request; return its value, pipe id and pipe fd (owned by the caller).

        Raises:
            ImageSourceError: the proxy reports a failure, or has gone away.
        """
        request = json.dumps({"method": method, "args": list(args)}).encode()
        async with self.lock:
            if self.out_of_step:
                raise ImageSourceError(
                    f"skopeo's image proxy: {method}: a cancelled request left no answer slot"
                )
            try:
                self.out_of_step = True  # until the reply to this request is in
                await self.sock.send(request)
                message, ancillary, _, _ = await self.sock.recvmsg(
                    _MAX_REPLY, socket.CMSG_SPACE(array.array("i").itemsize)
                )
                self.out_of_step = False
            except OSError as exc:
                raise ImageSourceError(f"skopeo's image proxy: {method}: {exc}") from None
        fds = _take_fds(ancillary)
        try:
            if not message:
                raise ImageSourceError(f"skopeo's image proxy exited during {method}")
            reply = json.loads(message)
            if not reply.get("success"):
                raise skopeo_error(f"skopeo: {method}: {reply.get('error') or 'failed'}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds[1:]:
            os.close(fd)
        return reply.get("value"), int(reply.get("pipeid") or 0), (fds[0] if fds else None)

    async def read_all(self, method: str, *args: object) -> tuple[object, bytes]:
        """A request whose payload comes through a pipe of unknown length: read it to
        its end while ``FinishPipe`` waits for the writer (the proxy closes the pipe then)."""
        value, pipeid, fd = await self.call(method, *args)
        if fd is None:
            raise ImageSourceError(f"skopeo's image proxy: {method} returned no data")
        pieces: list[bytes] = []
        failures: list[ImageSourceError] = []
        stream = trio.lowlevel.FdStream(fd)

        async def finish() -> None:
            try:
                await self.call("FinishPipe", pipeid)
            except ImageSourceError as exc:
                failures.append(exc)

        # Nothing below raises but cancellation, so that a failure comes out as
        # itself rather than in an ExceptionGroup of one.
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish)
                total = 0
                try:
                    while piece := await stream.receive_some(_CHUNK):
                        pieces.append(piece)
                        total += len(piece)
                        if total > 64 << 20:
                            failures.append(ImageSourceError(f"skopeo: {method}: over 64 MiB"))
                            break  # closing the pipe makes the writer, and FinishPipe, fail
                except trio.BrokenResourceError as exc:
                    failures.append(ImageSourceError(f"skopeo: {method}: {exc}"))
                stream.close()
        finally:
            stream.close()
        if failures:
            raise failures[0]  # the cause; a FinishPipe failure may follow it
        return value, b"".join(pieces)

    async def aclose(self) -> None:
        """Close the socket (the proxy exits at its end) and reap the process."""
        self.sock.close()
        with trio.CancelScope(shield=True), trio.move_on_after(10) as waited:
            await self.process.wait()
        if waited.cancelled_caught:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()


#: Seconds without data from a blob's pipe before asking the proxy whether its writer
#: is still at work (see :class:`_PipeStream`).
STALL_PROBE = 3.0


@attrs.define(eq=False)
class _PipeStream:
    """Async iterator over a blob the proxy writes into a pipe, ``size`` bytes long.

    After the last byte it calls ``FinishPipe``, so that a blob the proxy found
    corrupt ends in an error rather than quietly.

    The proxy closes the pipe only in ``FinishPipe``: a writer that fails half-way
    (the connection to the registry broke) leaves the pipe open and silent, and a
    reader waiting for the rest would wait forever. So when no byte has come for
    :data:`STALL_PROBE` seconds, ``FinishPipe`` is sent from a task of its own
    while reading goes on: it returns once the writer has stopped (at once if it
    failed, with the reason), and the pipe then ends. The proxy handles one
    request at a time, so other requests wait meanwhile; a merely slow
    connection is only serialized, never failed.
    """

    proxy: _Proxy
    stream: trio.lowlevel.FdStream
    pipeid: int
    remaining: int
    where: str
    nursery: trio.Nursery
    finished: bool = False
    _probe_done: trio.Event | None = None
    _probe_error: ComposefsError | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def _receive(self, n: int) -> bytes:
        if self._probe_done is None and not self.finished:
            with trio.move_on_after(STALL_PROBE):
                return await self.stream.receive_some(n)
            self._probe_done = trio.Event()
            self.nursery.start_soon(self._probe, self._probe_done)
        return await self.stream.receive_some(n)

    async def _probe(self, done: trio.Event) -> None:
        try:
            await self._finish()
        except ComposefsError as exc:
            self._probe_error = exc
        finally:
            done.set()

    async def _verdict(self) -> ComposefsError | None:
        """The writer's outcome (from the probe, or a ``FinishPipe`` of our own)."""
        if self._probe_done is not None:
            await self._probe_done.wait()
            return self._probe_error
        if self.finished:
            await trio.lowlevel.checkpoint()
            return None
        try:
            await self._finish()
        except ComposefsError as exc:
            return exc
        return None

    async def __anext__(self) -> bytes:
        if self.remaining > 0:
            piece = await self._receive(min(_CHUNK, self.remaining))
            if not piece:
                # The proxy's writer stopped: FinishPipe says why (the connection broke).
                with trio.move_on_after(10):
                    error = await self._verdict()
                if isinstance(error, DigestMismatchError):
                    raise error
                reason = (
                    str(error).removeprefix(f"{self.where}: ") if error is not None else "no reason"
                )
                raise SourceNetworkError(
                    f"{self.where}: the blob ends {self.remaining} bytes early ({reason})"
                )
            self.remaining -= len(piece)
            return piece
        error = await self._verdict()
        if error is not None:
            raise error
        raise StopAsyncIteration

    async def _finish(self) -> None:
        """``FinishPipe``: its failure, if any, raised with the blob named."""
        self.finished = True
        try:
            await self.proxy.call("FinishPipe", self.pipeid)
        except ComposefsError as exc:
            raise type(exc)(f"{self.where}: {exc}") from None

    async def release(self) -> None:
        """Close the pipe; release it in the proxy if the blob was not read to its end."""
        self.stream.close()
        # the writer fails on the closed pipe: that error is expected
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            if self._probe_done is not None:
                await self._probe_done.wait()
            elif not self.finished:
                self.finished = True
                with suppress(ComposefsError):
                    await self.proxy.call("FinishPipe", self.pipeid)


@attrs.define(eq=False)
class SkopeoProxySource:
    """An :class:`~trio_composefs.oci.ImageSource` that streams through skopeo's
    image proxy (``skopeo experimental-image-proxy``, protocol 0.2): no temporary copy;
    each layer flows from the source through a pipe as it is imported.

    The proxy hands out manifests converted to OCI (layer digests unchanged;
    Docker configs re-encoded), so the resolved manifest is that OCI form and
    its digest is that of those bytes, not the registry's manifest digest.
    Media types are the proxy's: for ``docker-archive:`` it labels plain tar
    layers ``+gzip``, so consumers should sniff the compression.

    Args:
        reference: the full skopeo reference, e.g. ``docker://quay.io/fedora/fedora:41``.
        skopeo: the program to run.
        extra_args: more options of ``experimental-image-proxy`` (``--cert-dir``...).
        options: TLS verification and credentials (``--tls-verify``, ``--authfile``,
            ``--creds``).
    """

    reference: str
    skopeo: str = "skopeo"
    extra_args: Sequence[str] = ()
    options: SkopeoOptions = attrs.field(factory=SkopeoOptions, kw_only=True)
    description: str = attrs.field(init=False)
    """The reference, as given."""
    _proxy: _Proxy | None = attrs.field(default=None, init=False)
    _image: int = attrs.field(default=0, init=False)
    _platform: Platform | None = attrs.field(default=None, init=False)
    _manifest: ResolvedImage | None = attrs.field(default=None, init=False)
    _entered: bool = attrs.field(default=False, init=False)
    _converted_config: object = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.description = self.reference

    async def __aenter__(self) -> SkopeoProxySource:
        self.skopeo = find_skopeo(self.skopeo)
        self._entered = True
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._entered = False
        await self._stop()

    async def _stop(self) -> None:
        proxy, self._proxy = self._proxy, None
        self._manifest = self._platform = None
        if proxy is not None:
            await proxy.aclose()

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """Open the image (for ``platform``, default the current one); its OCI manifest."""
        if not self._entered:
            raise ImageSourceError(f"{self.description}: used outside 'async with'")
        want = platform or Platform.current()
        if self._manifest is not None and self._platform == want:
            return self._manifest
        await self._stop()  # the platform is a process-wide option of the proxy
        self._proxy = await _Proxy.start(
            self.skopeo, want, [*self.options.proxy_args(), *self.extra_args]
        )
        image, _, _ = await self._proxy.call("OpenImage", self.reference)
        if not isinstance(image, int):
            raise ImageSourceError(f"skopeo: OpenImage gave {image!r}, not an image id")
        self._image = image
        original, data = await self._proxy.read_all("GetManifest", image)
        media_type = _manifest_media_type(data, where=f"{self.reference}: manifest")
        # a converted manifest names a converted config, which only GetFullConfig serves
        converted = original != "sha256:" + hashlib.sha256(data).hexdigest()
        config = parse_json(data, where=f"{self.reference}: manifest").get("config")
        self._converted_config = (
            config.get("digest") if converted and isinstance(config, dict) else None
        )
        self._manifest = ResolvedImage(
            data, "sha256:" + hashlib.sha256(data).hexdigest(), media_type
        )
        self._platform = want
        return self._manifest

    def _opened(self) -> _Proxy:
        if self._proxy is None or self._manifest is None:
            raise ImageSourceError(f"{self.description}: call resolve() before reading blobs")
        return self._proxy

    async def read_blob(self, descriptor: Descriptor, *, max_size: int = 64 << 20) -> bytes:
        """A small blob (the config), whole and checked against its digest."""
        if descriptor.size > max_size:
            raise ImageSourceError(
                f"{self.reference}: blob {descriptor.digest} is {descriptor.size} bytes"
                f" (more than {max_size})"
            )
        if descriptor.digest == self._converted_config:
            _, data = await self._opened().read_all("GetFullConfig", self._image)
        else:
            async with self.open_blob(descriptor) as stream:
                data = b"".join([piece async for piece in stream])
        return verify_blob(data, descriptor, where=self.reference)

    @asynccontextmanager
    async def open_blob(self, descriptor: Descriptor) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a blob through a pipe from the proxy, in pieces of at most 1 MiB.

        Reading it to its end also collects the proxy's verdict: a blob whose
        digest does not match fails there with :class:`ImageSourceError`.
        """
        proxy = self._opened()
        try:
            _, pipeid, fd = await proxy.call(
                "GetBlob", self._image, descriptor.digest, descriptor.size
            )
        except ComposefsError as exc:
            raise type(exc)(f"{self.reference}: blob {descriptor.digest}: {exc}") from None
        if fd is None:
            raise ImageSourceError(f"skopeo: GetBlob {descriptor.digest} returned no data")
        # The nursery runs only the stall probe, which never raises: an exception here is
        # the caller's own, passed through as itself (not in a group of one).
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            pipe = _PipeStream(
                proxy,
                trio.lowlevel.FdStream(fd),
                pipeid,
                descriptor.size,
                f"{self.reference}: blob {descriptor.digest}",
                nursery,
            )
            try:
                yield pipe
            except BaseException as exc:
                failure = exc
            finally:
                await pipe.release()
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
