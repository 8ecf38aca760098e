"""A real registry on loopback, for tests: the CNCF distribution registry (``docker-registry``).

:class:`LocalRegistry` runs ``docker-registry serve CONFIG`` on a free port of
127.0.0.1 with its own temporary storage directory, optionally behind htpasswd
authentication, and stops it afterwards. It never touches the system's
registry service (port 5000, ``/var/lib/docker-registry``): the Debian package
may start one on install, and tests neither need nor disturb it.

>>> with LocalRegistry(tmp_path / "registry") as registry:
...     registry.push("oci:/srv/layout:latest", "sample:latest")
...     ref = registry.reference("sample:latest")  # docker://127.0.0.1:PORT/sample:latest

Storage follows the registry's filesystem driver: blob ``sha256:HEX`` is
``storage/docker/registry/v2/blobs/sha256/HE/HEX/data`` (:meth:`blob_path`),
which a test may delete or change to fault the registry.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs

__all__ = ["LocalRegistry", "RegistryUnavailable", "find_registry"]

#: Where Debian's ``docker-registry`` package installs the registry.
DEFAULT_PROGRAM = "/usr/bin/docker-registry"


class RegistryUnavailable(RuntimeError):
    """The registry program (or htpasswd, or skopeo) is not installed, or would not start."""


def find_registry(program: str | None = None) -> str:
    """The registry executable: ``program``, ``docker-registry`` on PATH, or Debian's path.

    Raises:
        RegistryUnavailable: none is installed.
    """
    for candidate in (program, shutil.which("docker-registry"), DEFAULT_PROGRAM):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RegistryUnavailable(
        "docker-registry is not installed (Debian: apt-get install docker-registry)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _htpasswd_line(user: str, password: str) -> str:
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise RegistryUnavailable("htpasswd is not installed (Debian: apache2-utils)")
    result = subprocess.run(
        [htpasswd, "-Bbn", user, password], check=True, capture_output=True, text=True
    )
    return result.stdout.strip() + "\n"


@attrs.define(eq=False)
class LocalRegistry:
    """A ``docker-registry`` process serving ``root/storage`` on 127.0.0.1.

    Args:
        root: a directory of its own (config, storage, log, htpasswd); created.
        users: ``{user: password}``: require htpasswd (basic) authentication.
        program: the registry executable (default: :func:`find_registry`).
    """

    root: Path = attrs.field(converter=Path)
    users: dict[str, str] | None = None
    program: str | None = None
    port: int = attrs.field(default=0, init=False)
    process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as image references spell it."""
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def reference(self, name: str) -> str:
        """``docker://127.0.0.1:PORT/NAME[:TAG]``."""
        return f"docker://{self.host}/{name}"

    def blob_path(self, digest: str) -> Path:
        """Where the registry stores blob ``sha256:HEX``."""
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    # --- lifecycle ------------------------------------------------------------
    def start(self, *, timeout: float = 20.0) -> LocalRegistry:
        """Start (or restart, on a new free port) and wait until it answers.

        Raises:
            RegistryUnavailable: not installed, or not answering within ``timeout``.
        """
        if self.process is not None:
            raise RuntimeError("the registry is already running")
        program = find_registry(self.program)
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        for _attempt in range(5):  # another process may take the free port first
            self.port = _free_port()
            config = self._write_config()
            log = open(self.root / "registry.log", "ab")  # noqa: SIM115 - the child keeps it
            try:
                self.process = subprocess.Popen(
                    [program, "serve", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # Ctrl-C in a terminal is the test run's
                )
            finally:
                log.close()
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RegistryUnavailable(
            f"docker-registry did not start; see {self.root / 'registry.log'}"
        )

    def _write_config(self) -> Path:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host, "secret": "trio-composefs-tests"},
        }
        if self.users is not None:
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text("".join(_htpasswd_line(u, p) for u, p in self.users.items()))
            config["auth"] = {"htpasswd": {"realm": "trio-composefs", "path": str(htpasswd)}}
        path = self.root / "config.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):
                    return True
            except urllib.error.HTTPError as e:
                return e.code == 401  # up, and asking for credentials
            except OSError:
                time.sleep(0.05)
        return False

    def kill(self) -> None:
        """Kill the registry by its PID (SIGKILL), as a crash or a pulled plug would."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """Stop the registry (SIGTERM, then SIGKILL after 10 s). Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- clients ----------------------------------------------------------------
    def credentials(self) -> str:
        """``USER:PASSWORD`` of the first user (for ``--creds``)."""
        if not self.users:
            raise ValueError("this registry has no users")
        user, password = next(iter(self.users.items()))
        return f"{user}:{password}"

    def write_authfile(self, path: str | os.PathLike[str]) -> Path:
        """Write a ``containers-auth.json(5)`` file holding :meth:`credentials`."""
        token = base64.b64encode(self.credentials().encode()).decode()
        target = Path(path)
        target.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        return target

    def push(self, source: str, name: str, *, all_images: bool = False) -> str:
        """``skopeo copy SOURCE docker://HOST/NAME`` byte for byte; return the reference.

        ``--preserve-digests`` keeps every blob and manifest as the source has
        them (skopeo would otherwise compress an uncompressed layer);
        ``all_images`` copies every image of an index (``--all``).
        """
        skopeo = shutil.which("skopeo")
        if skopeo is None:
            raise RegistryUnavailable("skopeo is not installed")
        dest = self.reference(name)
        command = [skopeo, "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
        if self.users:
            command += ["--dest-creds", self.credentials()]
        if all_images:
            command.append("--all")
        result = subprocess.run([*command, source, dest], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"skopeo copy {source} {dest} failed: {result.stderr.strip()}")
        return dest
