"""The pure pieces of the kernel mount: option strings, mountinfo unescaping, loop structs.

These need no root; the real kernel's reading of the same strings is tested in
test_mount_kernel.py (an objects path with ':' ',' '\\' mounted both ways).
"""

from __future__ import annotations

import os
import struct

from trio_composefs.mount import _kernel
from trio_composefs.mount._kernel import _Options


def test_read_only_option_string() -> None:
    opts = _Options(verity=False, upperdir=None, workdir=None, acl=False)
    assert _kernel.overlay_options("/tmp/e", "/repo/objects", opts) == (
        "ro,metacopy=on,redirect_dir=on,lowerdir=/tmp/e::/repo/objects"
    )


def test_writable_verity_option_string_escapes_separators() -> None:
    opts = _Options(verity=True, upperdir="/u:p,x", workdir="/w\\k", acl=True)
    assert _kernel.overlay_options("/tmp/e", "/r:e,p\\o", opts) == (
        "metacopy=on,redirect_dir=on,lowerdir=/tmp/e::/r\\:e\\,p\\\\o,"
        "upperdir=/u\\:p\\,x,workdir=/w\\\\k,verity=require"
    )


def test_mountinfo_unescape() -> None:
    assert _kernel._unescape_mountinfo("/a\\040b\\134c\\011d\\012") == "/a b\\c\td\n"
    assert _kernel._unescape_mountinfo("/plain") == "/plain"


def test_is_mount_point_of_root_and_a_plain_dir(tmp_path: os.PathLike[str]) -> None:
    assert _kernel.is_mount_point("/")
    assert not _kernel.is_mount_point(os.fspath(tmp_path))


def test_loop_structs_have_the_kernel_sizes() -> None:
    # include/uapi/linux/loop.h: sizeof(struct loop_info64) == 232,
    # sizeof(struct loop_config) == 4 + 4 + 232 + 8 * 8 == 304.
    assert _kernel.LOOP_INFO64.size == 232
    assert _kernel.LOOP_CONFIG.size == 304
    packed = _kernel.LOOP_CONFIG.pack(7, 0, bytes(232))
    assert struct.unpack_from("<I", packed)[0] == 7
