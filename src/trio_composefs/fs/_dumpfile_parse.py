"""A strict parser for composefs dumpfiles (composefs-dump(5)), the ``--from-file`` input.

Pure (layer L0): bytes in, a :class:`~._tree.FileSystem` out. It accepts what C
``mkcomposefs --from-file`` accepts with ``CFS_PARSE_STRICT`` set, and the forms
composefs-rs's ``dumpfile_parse.rs`` writes, and rejects the rest with a
:class:`DumpfileError` naming the line and the field.

The format, one entry per line (``\\n``-terminated; the last newline is optional)::

    PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST [KEY=VALUE ...]

* Eleven fields separated by single spaces, then zero or more xattrs. A single
  trailing space is tolerated (C's splitter ignores it); an empty field is not.
* Escapes: ``\\\\``, ``\\n``, ``\\r``, ``\\t`` and ``\\xHH``; any other escape is an
  error. A lone ``-`` in PATH, PAYLOAD, CONTENT or DIGEST means "absent". A raw NUL
  anywhere is an error, and so is an escaped one in a path, a payload or an xattr
  name.
* PATH is absolute and canonical: ``/`` for the root, which must be the first entry,
  and otherwise no empty, ``.`` or ``..`` component, components of at most 255
  bytes, 4096 bytes in all. The parent must already be present and be a directory.
* SIZE is decimal. Ignored for directories; a regular file's CONTENT must have
  exactly SIZE bytes (at most 5000, C's limit); a symlink's SIZE must equal the
  length of its target (strict mode). An external file (SIZE > 0, no CONTENT) has
  at most 1024 chunks, as C's writer requires.
* MODE is octal ``st_mode`` with the file type. ``@MODE`` marks a hard link: only
  PATH and PAYLOAD (the target's path) count, the other fields are skipped, as
  both C (which writes the target's values) and composefs-rs (which writes ``0
  @120000 - - - - 0.0 TARGET - -``) do. A target may come later in the file (C
  resolves links at the end); chains of links are followed; a link to a
  directory, to itself, to a missing path, or a cycle is an error.
* NLINK is checked to be a number and otherwise ignored: in the tree a leaf's link
  count is the number of its names.
* UID and GID are 32-bit; RDEV (glibc ``dev_t``) must be 0 except for devices,
  whose number must fit the 32 bits EROFS stores; MTIME is ``SEC.NSEC`` with NSEC a
  count of nanoseconds (< 10**9), not a fraction.
* PAYLOAD is the symlink target (1 to 4095 bytes), the backing path of an external
  file (UTF-8: the tree holds it as ``str``), or the hard-link target. CONTENT is
  the inline data of a regular file. DIGEST is the hex fs-verity digest (64 or 128
  digits) of an external file. Any of them on an entry that cannot have it is an
  error.
* Xattr names are 1 to 255 bytes, values at most 65535 bytes, each name at most
  once per entry; the xattrs of one entry are limited as C limits them (about
  32 KiB in EROFS, 65535 characters of text).

The parser is iterative and keeps one line (at most 256 KiB) plus the tree in
memory; it takes the whole file as ``bytes`` or any iterable of chunks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from .._errors import DumpfileError
from ..formats._fsverity import Algorithm, Digest
from ._tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    Fifo,
    FileSystem,
    InlineFile,
    Leaf,
    LeafContent,
    Socket,
    Stat,
    Symlink,
)

__all__ = ["MAX_LINE_LENGTH", "parse_dumpfile"]

#: The longest line accepted: far above any valid entry (a 4096-byte path and a
#: 5000-byte content fully ``\\xHH``-escaped, plus 65535 characters of xattrs).
MAX_LINE_LENGTH = 256 * 1024

FIELD_NAMES = (
    "PATH",
    "SIZE",
    "MODE",
    "NLINK",
    "UID",
    "GID",
    "RDEV",
    "MTIME",
    "PAYLOAD",
    "CONTENT",
    "DIGEST",
)

PATH_MAX = 4096
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65535
INLINE_CONTENT_MAX = 5000  # LCFS_INLINE_CONTENT_MAX
MAX_NONINLINE_CHUNKS = 1024  # LCFS_MAX_NONINLINE_CHUNKS
# C's per-inode xattr budget for dumpfile input (LCFS_INODE_EXTERNAL_XATTR_MAX) and
# its accounting: a 12-byte header plus, per xattr, 2 * 4 - 1 + len(name) + len(value).
XATTR_BUDGET = 65535 // 2
XATTR_TEXT_MAX = 65535

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1

_DECIMAL = re.compile(rb"[0-9]{1,20}")
_OCTAL = re.compile(rb"[0-7]{1,22}")
_MTIME = re.compile(rb"(-?[0-9]{1,20})\.([0-9]{1,20})")
_HEX = re.compile(rb"[0-9a-fA-F]+")
_ESCAPE = re.compile(rb"\\(?:([\\nrt])|x([0-9a-fA-F]{2}))")
_NAMED = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}

_DIGEST_LENGTHS = {2 * alg.digest_size: alg for alg in Algorithm}

_VALID_TYPES = {
    S_IFREG: "regular file",
    S_IFDIR: "directory",
    S_IFLNK: "symlink",
    S_IFBLK: "block device",
    S_IFCHR: "character device",
    S_IFIFO: "fifo",
    S_IFSOCK: "socket",
}


def _unescape(text: bytes, lineno: int, field: str) -> bytes:
    """Undo the dumpfile escapes; anything but the five known ones is an error."""
    if b"\\" not in text:
        return text
    out = bytearray()
    pos = 0
    while True:
        bs = text.find(b"\\", pos)
        if bs < 0:
            out += text[pos:]
            return bytes(out)
        out += text[pos:bs]
        m = _ESCAPE.match(text, bs)
        if m is None:
            bad = text[bs : bs + 4]
            raise DumpfileError(
                f"invalid escape {bad!r} at character {bs + 1}"
                " (only \\\\, \\n, \\r, \\t and \\xHH are allowed)",
                line=lineno,
                field=field,
            )
        named, hexpair = m.group(1), m.group(2)
        out += _NAMED[named] if named is not None else bytes([int(hexpair, 16)])
        pos = m.end()


def _optional(text: bytes, lineno: int, field: str) -> bytes | None:
    if text == b"-":
        return None
    return _unescape(text, lineno, field)


def _decimal(text: bytes, lineno: int, field: str, maximum: int) -> int:
    if not _DECIMAL.fullmatch(text):
        raise DumpfileError(f"not a decimal number: {text[:40]!r}", line=lineno, field=field)
    value = int(text)
    if value > maximum:
        raise DumpfileError(
            f"{value} is out of range (maximum {maximum})", line=lineno, field=field
        )
    return value


def _mode(text: bytes, lineno: int) -> int:
    if not _OCTAL.fullmatch(text):
        raise DumpfileError(f"not an octal mode: {text[:40]!r}", line=lineno, field="MODE")
    mode = int(text, 8)
    if mode > 0o177777:
        raise DumpfileError(f"mode {mode:o} has bits above 0o177777", line=lineno, field="MODE")
    if mode & S_IFMT not in _VALID_TYPES:
        raise DumpfileError(f"mode {mode:o} has no valid file type", line=lineno, field="MODE")
    return mode


def _mtime(text: bytes, lineno: int) -> tuple[int, int]:
    m = _MTIME.fullmatch(text)
    if m is None:
        raise DumpfileError(f"not SEC.NSEC: {text[:40]!r}", line=lineno, field="MTIME")
    sec, nsec = int(m.group(1)), int(m.group(2))
    if not _I64_MIN <= sec <= _I64_MAX:
        raise DumpfileError(f"seconds {sec} out of range", line=lineno, field="MTIME")
    if nsec > 999_999_999:
        raise DumpfileError(
            f"nanoseconds {nsec} out of range (NSEC counts nanoseconds, it is not a fraction)",
            line=lineno,
            field="MTIME",
        )
    return sec, nsec


def _path_components(raw: bytes, lineno: int, field: str) -> list[bytes]:
    """Split an unescaped absolute canonical path; ``[]`` for the root."""
    if not raw:
        raise DumpfileError("empty path", line=lineno, field=field)
    if b"\0" in raw:
        raise DumpfileError("NUL byte in path", line=lineno, field=field)
    if len(raw) > PATH_MAX:
        raise DumpfileError(
            f"path of {len(raw)} bytes exceeds {PATH_MAX}", line=lineno, field=field
        )
    if raw[:1] != b"/":
        raise DumpfileError(f"path {raw[:80]!r} is not absolute", line=lineno, field=field)
    if raw == b"/":
        return []
    parts = raw[1:].split(b"/")
    for part in parts:
        if part == b"":
            raise DumpfileError(
                f"empty component in path {raw[:80]!r} (// or a trailing /)",
                line=lineno,
                field=field,
            )
        if part in (b".", b".."):
            raise DumpfileError(
                f"invalid component {part!r} in path {raw[:80]!r}", line=lineno, field=field
            )
        if len(part) > NAME_MAX:
            raise DumpfileError(
                f"a name of {len(part)} bytes exceeds {NAME_MAX} in path {raw[:80]!r}",
                line=lineno,
                field=field,
            )
    return parts


def _xattrs(parts: list[bytes], lineno: int) -> dict[bytes, bytes]:
    xattrs: dict[bytes, bytes] = {}
    budget = 12
    for part in parts:
        key_text, sep, value_text = part.partition(b"=")
        if not sep:
            raise DumpfileError(f"xattr {part[:60]!r} has no '='", line=lineno, field="XATTR")
        key = _unescape(key_text, lineno, "XATTR")
        if not key:
            raise DumpfileError("empty xattr name", line=lineno, field="XATTR")
        if len(key) > XATTR_NAME_MAX:
            raise DumpfileError(
                f"xattr name of {len(key)} bytes exceeds {XATTR_NAME_MAX}",
                line=lineno,
                field="XATTR",
            )
        if b"\0" in key:
            raise DumpfileError(f"NUL byte in xattr name {key!r}", line=lineno, field="XATTR")
        value = _unescape(value_text, lineno, "XATTR")
        if len(value) > XATTR_SIZE_MAX:
            raise DumpfileError(
                f"value of xattr {key!r} has {len(value)} bytes, more than {XATTR_SIZE_MAX}",
                line=lineno,
                field="XATTR",
            )
        if key in xattrs:
            raise DumpfileError(f"xattr {key!r} given twice", line=lineno, field="XATTR")
        xattrs[key] = value
        budget += 7 + len(key) + len(value)
        if budget > XATTR_BUDGET:
            raise DumpfileError(
                f"the xattrs exceed the {XATTR_BUDGET}-byte budget of one inode",
                line=lineno,
                field="XATTR",
            )
    return xattrs


def _forbid(value: object, field: str, ftype: int, lineno: int) -> None:
    if value is not None:
        raise DumpfileError(
            f"a {_VALID_TYPES[ftype]} cannot have a {field}", line=lineno, field=field
        )


def _chunk_count(size: int) -> int:
    """The number of chunks C's EROFS writer uses for an external file of ``size`` bytes."""
    chunkbits = min(max(12, (size - 1).bit_length()), 43)
    return -(-size // (1 << chunkbits))


def _lines(data: bytes | bytearray | memoryview | Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Split the input into numbered lines; the final newline is optional."""
    chunks: Iterable[bytes] = (
        (bytes(data),) if isinstance(data, bytes | bytearray | memoryview) else data
    )
    buf = bytearray()
    lineno = 0
    for chunk in chunks:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                buf += chunk[start:]
                if len(buf) > MAX_LINE_LENGTH:
                    raise DumpfileError(
                        f"line longer than {MAX_LINE_LENGTH} bytes", line=lineno + 1
                    )
                break
            lineno += 1
            if buf:
                buf += chunk[start:nl]
                line = bytes(buf)
                buf.clear()
            else:
                line = chunk[start:nl]
            if len(line) > MAX_LINE_LENGTH:
                raise DumpfileError(f"line longer than {MAX_LINE_LENGTH} bytes", line=lineno)
            yield lineno, line
            start = nl + 1
    if buf:
        yield lineno + 1, bytes(buf)


class _Parser:
    """The state of one parse: the tree so far and the unresolved hard links."""

    def __init__(self) -> None:
        self.root: Directory | None = None
        # Every directory by its unescaped path, so a parent is found in O(1).
        self.dirs: dict[bytes, Directory] = {}
        # Placeholder leaves of hard links, by id: (path, target path, its parts, line).
        self.links: dict[int, tuple[bytes, bytes, list[bytes], int]] = {}
        self.link_slots: list[tuple[Directory, bytes, Leaf]] = []

    def parent_of(self, path: bytes, parts: list[bytes], lineno: int) -> Directory:
        parent_path = path.rpartition(b"/")[0] or b"/"
        parent = self.dirs.get(parent_path)
        if parent is not None:
            return parent
        # Find out why, for the message.
        node: Directory | Leaf | None = self.root
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, Directory):  # pragma: no cover - checked below
                break
            child = node.entries.get(part)
            if child is None:
                missing = b"/" + b"/".join(parts[: i + 1])
                raise DumpfileError(
                    f"parent directory {missing!r} of {path!r} is not present (yet)",
                    line=lineno,
                    field="PATH",
                )
            if not isinstance(child, Directory):
                notdir = b"/" + b"/".join(parts[: i + 1])
                raise DumpfileError(
                    f"parent {notdir!r} of {path!r} is not a directory", line=lineno, field="PATH"
                )
            node = child
        raise DumpfileError(  # pragma: no cover - dirs always holds every directory
            f"parent of {path!r} not found", line=lineno, field="PATH"
        )

    def line(self, lineno: int, line: bytes) -> None:
        nul = line.find(b"\0")
        if nul >= 0:
            raise DumpfileError(f"NUL byte at character {nul + 1}", line=lineno)
        fields = line.split(b" ")
        if len(fields) < 11:
            raise DumpfileError(
                f"{len(fields)} fields, expected at least 11",
                line=lineno,
                field=FIELD_NAMES[len(fields)],
            )
        for i in range(11):
            if not fields[i]:
                raise DumpfileError("empty field", line=lineno, field=FIELD_NAMES[i])
        path = _unescape(fields[0], lineno, "PATH")
        parts = _path_components(path, lineno, "PATH")
        if self.root is None and parts:
            raise DumpfileError(
                f"the first entry must be the root directory '/', not {path[:80]!r}",
                line=lineno,
                field="PATH",
            )

        mode_text = fields[2]
        is_link = mode_text[:1] == b"@"
        mode = _mode(mode_text[1:] if is_link else mode_text, lineno)
        ftype = mode & S_IFMT

        if is_link:
            if ftype == S_IFDIR:
                raise DumpfileError(
                    f"directory {path!r} cannot be a hard link", line=lineno, field="MODE"
                )
            if not parts:
                raise DumpfileError("the root cannot be a hard link", line=lineno, field="MODE")
            target = _optional(fields[8], lineno, "PAYLOAD")
            if target is None:
                raise DumpfileError(
                    f"hard link {path!r} has no target", line=lineno, field="PAYLOAD"
                )
            target_parts = _path_components(target, lineno, "PAYLOAD")
            if target == path:
                raise DumpfileError(
                    f"hard link {path!r} points to itself", line=lineno, field="PAYLOAD"
                )
            placeholder = Leaf(Stat(0), Fifo())
            parent = self.parent_of(path, parts, lineno)
            self.add(parent, parts[-1], placeholder, path, lineno)
            self.links[id(placeholder)] = (path, target, target_parts, lineno)
            self.link_slots.append((parent, parts[-1], placeholder))
            return

        size = _decimal(fields[1], lineno, "SIZE", _U64)
        _decimal(fields[3], lineno, "NLINK", _U32)
        uid = _decimal(fields[4], lineno, "UID", _U32)
        gid = _decimal(fields[5], lineno, "GID", _U32)
        rdev = _decimal(fields[6], lineno, "RDEV", _U64)
        mtime, mtime_nsec = _mtime(fields[7], lineno)
        payload = _optional(fields[8], lineno, "PAYLOAD")
        content = _optional(fields[9], lineno, "CONTENT")
        digest_text = fields[10]

        xattr_fields = fields[11:]
        if xattr_fields == [b""]:
            xattr_fields = []  # one trailing space: C's splitter accepts it
        if xattr_fields:
            text_len = len(line) - sum(len(f) + 1 for f in fields[:11])
            if text_len > XATTR_TEXT_MAX:
                raise DumpfileError(
                    f"{text_len} characters of xattrs, more than {XATTR_TEXT_MAX}",
                    line=lineno,
                    field="XATTR",
                )
        stat = Stat(mode & 0o7777, uid, gid, mtime, mtime_nsec, _xattrs(xattr_fields, lineno))

        if ftype not in (S_IFCHR, S_IFBLK) and rdev != 0:
            raise DumpfileError(
                f"a {_VALID_TYPES[ftype]} cannot have a device number ({rdev})",
                line=lineno,
                field="RDEV",
            )
        if ftype != S_IFREG:
            _forbid(content, "CONTENT", ftype, lineno)
            _forbid(None if digest_text == b"-" else digest_text, "DIGEST", ftype, lineno)

        if ftype == S_IFDIR:
            _forbid(payload, "PAYLOAD", ftype, lineno)
            if not parts:
                if self.root is not None:
                    raise DumpfileError("a second root entry", line=lineno, field="PATH")
                self.root = Directory(stat)
                self.dirs[b"/"] = self.root
                return
            directory = Directory(stat)
            self.add(self.parent_of(path, parts, lineno), parts[-1], directory, path, lineno)
            self.dirs[path] = directory
            return

        if not parts:
            raise DumpfileError(
                f"the root must be a directory, not a {_VALID_TYPES[ftype]}",
                line=lineno,
                field="MODE",
            )

        leaf_content: LeafContent
        if ftype == S_IFREG:
            leaf_content = self.regular(size, payload, content, digest_text, lineno)
        elif ftype == S_IFLNK:
            if payload is None:
                raise DumpfileError(f"symlink {path!r} has no target", line=lineno, field="PAYLOAD")
            if b"\0" in payload:
                raise DumpfileError("NUL byte in symlink target", line=lineno, field="PAYLOAD")
            if len(payload) >= PATH_MAX:
                raise DumpfileError(
                    f"symlink target of {len(payload)} bytes, the limit is {PATH_MAX - 1}",
                    line=lineno,
                    field="PAYLOAD",
                )
            if size != len(payload):
                raise DumpfileError(
                    f"symlink SIZE {size} differs from its target length {len(payload)}",
                    line=lineno,
                    field="SIZE",
                )
            leaf_content = Symlink(payload)
        else:
            _forbid(payload, "PAYLOAD", ftype, lineno)
            if ftype in (S_IFCHR, S_IFBLK) and rdev > _U32:
                raise DumpfileError(
                    f"device number {rdev} does not fit the 32 bits EROFS stores",
                    line=lineno,
                    field="RDEV",
                )
            if ftype == S_IFCHR:
                leaf_content = CharDevice(rdev)
            elif ftype == S_IFBLK:
                leaf_content = BlockDevice(rdev)
            elif ftype == S_IFIFO:
                leaf_content = Fifo()
            else:
                leaf_content = Socket()
        leaf = Leaf(stat, leaf_content)
        self.add(self.parent_of(path, parts, lineno), parts[-1], leaf, path, lineno)

    @staticmethod
    def regular(
        size: int, payload: bytes | None, content: bytes | None, digest_text: bytes, lineno: int
    ) -> InlineFile | ExternalFile:
        digest: Digest | None = None
        if digest_text != b"-":
            algorithm = _DIGEST_LENGTHS.get(len(digest_text))
            if algorithm is None or not _HEX.fullmatch(digest_text):
                raise DumpfileError(
                    f"not a hex fs-verity digest (64 or 128 hex digits): {digest_text[:80]!r}",
                    line=lineno,
                    field="DIGEST",
                )
            digest = Digest(algorithm, bytes.fromhex(digest_text.decode("ascii")))
        if content is not None:
            if payload is not None:
                raise DumpfileError(
                    "a regular file cannot have both a PAYLOAD and CONTENT",
                    line=lineno,
                    field="PAYLOAD",
                )
            if digest is not None:
                raise DumpfileError(
                    "a file with inline CONTENT cannot have a DIGEST", line=lineno, field="DIGEST"
                )
            if len(content) != size:
                raise DumpfileError(
                    f"CONTENT has {len(content)} bytes but SIZE is {size}",
                    line=lineno,
                    field="CONTENT",
                )
            if size > INLINE_CONTENT_MAX:
                raise DumpfileError(
                    f"inline CONTENT of {size} bytes exceeds {INLINE_CONTENT_MAX}",
                    line=lineno,
                    field="CONTENT",
                )
            return InlineFile(content)
        if size == 0:
            if payload is not None or digest is not None:
                raise DumpfileError(
                    "an empty regular file cannot have a PAYLOAD or a DIGEST",
                    line=lineno,
                    field="PAYLOAD" if payload is not None else "DIGEST",
                )
            return InlineFile(b"")
        if _chunk_count(size) > MAX_NONINLINE_CHUNKS:
            raise DumpfileError(
                f"file of {size} bytes is too big for a composefs image"
                f" (more than {MAX_NONINLINE_CHUNKS} chunks)",
                line=lineno,
                field="SIZE",
            )
        payload_str: str | None = None
        if payload is not None:
            if b"\0" in payload:
                raise DumpfileError("NUL byte in payload", line=lineno, field="PAYLOAD")
            if len(payload) >= PATH_MAX:
                raise DumpfileError(
                    f"payload of {len(payload)} bytes, the limit is {PATH_MAX - 1}",
                    line=lineno,
                    field="PAYLOAD",
                )
            try:
                payload_str = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise DumpfileError(
                    f"the backing path {payload[:80]!r} is not UTF-8", line=lineno, field="PAYLOAD"
                ) from None
        return ExternalFile(size, digest, payload_str)

    def add(
        self, parent: Directory, name: bytes, inode: Directory | Leaf, path: bytes, lineno: int
    ) -> None:
        if name in parent.entries:
            raise DumpfileError(f"path {path!r} is given twice", line=lineno, field="PATH")
        parent.entries[name] = inode

    def lookup(self, parts: list[bytes]) -> Directory | Leaf | None:
        node: Directory | Leaf | None = self.root
        for part in parts:
            if not isinstance(node, Directory):
                return None
            node = node.entries.get(part)
        return node

    def finish(self) -> FileSystem:
        if self.root is None:
            raise DumpfileError("no entries: a dumpfile starts with the root directory '/'")
        resolved: dict[int, Leaf] = {}
        for parent, name, placeholder in self.link_slots:
            parent.entries[name] = self.resolve(placeholder, resolved)
        return FileSystem(self.root)

    def resolve(self, placeholder: Leaf, resolved: dict[int, Leaf]) -> Leaf:
        """Follow a chain of hard links to a real leaf; iterative, cycles are errors."""
        chain: list[Leaf] = []
        seen: set[int] = set()
        node: Directory | Leaf | None = placeholder
        while isinstance(node, Leaf) and id(node) in self.links and id(node) not in resolved:
            if id(node) in seen:
                path, _, _, lineno = self.links[id(placeholder)]
                raise DumpfileError(
                    f"hard link {path!r} is part of a cycle of hard links",
                    line=lineno,
                    field="PAYLOAD",
                )
            seen.add(id(node))
            chain.append(node)
            path, target, target_parts, lineno = self.links[id(node)]
            node = self.lookup(target_parts)
            if node is None:
                raise DumpfileError(
                    f"target {target!r} of hard link {path!r} does not exist",
                    line=lineno,
                    field="PAYLOAD",
                )
            if isinstance(node, Directory):
                raise DumpfileError(
                    f"target {target!r} of hard link {path!r} is a directory",
                    line=lineno,
                    field="PAYLOAD",
                )
        assert isinstance(node, Leaf)
        final = resolved.get(id(node), node)
        for link in chain:
            resolved[id(link)] = final
        return final


def parse_dumpfile(data: bytes | bytearray | memoryview | Iterable[bytes]) -> FileSystem:
    """Parse a composefs dumpfile into a tree, strictly (see the module docstring).

    Args:
        data: the whole dumpfile, or an iterable of chunks split anywhere.

    Returns:
        The tree. Hard-linked names share one :class:`~._tree.Leaf`.

    Raises:
        DumpfileError: the input breaks a rule of the format; the message names the
            line and the field.
    """
    parser = _Parser()
    for lineno, line in _lines(data):
        parser.line(lineno, line)
    return parser.finish()
