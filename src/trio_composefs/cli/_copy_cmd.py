"""``oci copy IMAGE --from REPO [--tag NAME]``: copy a stored image between repositories."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

import trio

from ..repository import Repository
from ._commands import _open_repo


def add_copy_parser(oci_sub: Any) -> None:
    """The ``oci copy`` subcommand."""
    copy = oci_sub.add_parser(
        "copy",
        help="copy a stored image (and all it needs) from another repository, verified",
    )
    copy.add_argument("image", metavar="IMAGE", help="a tag, or @sha256:... in the source")
    copy.add_argument(
        "--from", dest="source", required=True, metavar="REPO", help="the source repository"
    )
    copy.add_argument(
        "--tag", metavar="NAME", help="tag it here (default: IMAGE, when IMAGE is a tag)"
    )


def cmd_oci_copy(args: argparse.Namespace, out: TextIO) -> int:
    from ..oci import copy_image

    image: str = args.image
    tag = args.tag
    if tag is None and not image.startswith(("@", "sha256:")):
        tag = image
    with (
        Repository.open(args.source, insecure=True if args.insecure else None) as src,
        _open_repo(args) as dst,
    ):
        stats = trio.run(lambda: copy_image(src, dst, image, tag=tag))
    print(f"manifest {stats.manifest_digest}", file=out)
    print(f"config   {stats.config_digest}", file=out)
    print(
        f"objects  {stats.objects} ({stats.linked} linked, {stats.copied} copied,"
        f" {stats.present} already present)",
        file=out,
    )
    if tag is not None:
        print(f"tagged   {tag}", file=out)
    return 0
