"""Rebuild a composefs-rs EROFS image from one of its ``insta`` debug snapshots.

composefs-rs pins its legacy V2 writer with snapshots of ``debug_fs`` (every struct at
its offset, every non-zero field) in ``crates/composefs/tests/snapshots/mkfs__*.snap``
and with the fs-verity digest of the same image (``tests/mkfs.rs``). Filling the
listed fields into a zeroed image of the stated total size gives the image back; the
pinned digest proves it byte for byte.
"""

from __future__ import annotations

import re
import struct

_SECTION = re.compile(r"^([0-9a-f]{8}) (\w+)$")
_FIELD = re.compile(r"^\s+\+([0-9a-f]+)\s+(.*)$")
_TOTAL = re.compile(r"total size (\d+)B")
_FILE_TYPES = {
    "RegularFile": 1,
    "Directory": 2,
    "CharacterDevice": 3,
    "BlockDevice": 4,
    "Fifo": 5,
    "Socket": 6,
    "Symlink": 7,
}
_WIDTH = {"U16": "<H", "U32": "<I", "U64": "<Q"}


def _rust_string(text: str) -> bytes:
    """Decode a Rust ``{:?}`` string literal body (without the quotes)."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        n = text[i + 1]
        if n == "u":
            end = text.index("}", i)
            out += chr(int(text[i + 3 : end], 16)).encode()
            i = end + 1
            continue
        out += {"0": b"\0", "n": b"\n", "t": b"\t", "r": b"\r", "\\": b"\\", '"': b'"', "'": b"'"}[
            n
        ]
        i += 2
    return bytes(out)


def image_from_snapshot(text: str) -> bytes:
    total = _TOTAL.search(text)
    assert total is not None
    image = bytearray(int(total.group(1)))
    base = 0
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            base = int(m.group(1), 16)
            continue
        m = _FIELD.match(line)
        if not m:
            continue
        off, body = int(m.group(1), 16), m.group(2)
        if body.startswith("--- inline directory entries"):
            base += off
            continue
        if body.startswith("# name: "):
            name = _rust_string(body[len('# name: "') : -1])
            image[base + off : base + off + len(name)] = name
            continue
        if body.startswith("#"):
            continue
        key, _, value = body.partition(": ")
        at = base + off
        if key == "xattr":
            xm = re.fullmatch(r'\((\d+) (\d+) (\d+)\) (\w*)\."(.*)" = "(.*)"', value)
            assert xm is not None, value
            index, name_len, value_len = (int(xm.group(i)) for i in (1, 2, 3))
            suffix, data = _rust_string(xm.group(5)), _rust_string(xm.group(6))
            assert (len(suffix), len(data)) == (name_len, value_len)
            entry = struct.pack("<BBH", name_len, index, value_len) + suffix + data
            image[at : at + len(entry)] = entry
        elif key == "inline":
            data = _rust_string(value[1:-1])
            image[at : at + len(data)] = data
        elif key == "format":
            struct.pack_into("<H", image, at, int(value.split()[0]))
        elif key == "mode":
            struct.pack_into("<H", image, at, int(value.split()[0], 8))
        elif key == "file_type":
            image[at] = _FILE_TYPES[value]
        elif key == "blkszbits":
            image[at] = int(value)
        elif (wm := re.fullmatch(r"(U16|U32|U64)\((\d+)\)", value)) is not None:
            struct.pack_into(_WIDTH[wm.group(1)], image, at, int(wm.group(2)))
        elif re.fullmatch(r"([0-9a-f]{2} ?)+", key.split("|")[0].strip()):
            # a hexdump row of 16 bytes; absent leading bytes show as spaces in the
            # ASCII column
            hexpart, ascii_part = body.split("|")[0], body.split("|")[1]
            raw = bytes.fromhex(hexpart)
            at += len(ascii_part) - len(ascii_part.lstrip(" "))
            image[at : at + len(raw)] = raw
        else:
            raise AssertionError(f"unknown snapshot line {line!r}")
    return bytes(image)
