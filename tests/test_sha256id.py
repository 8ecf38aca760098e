"""``Sha256Id``: the one ``sha256:<hex>`` identifier, and its one syntax error.

The oracle for :meth:`Sha256Id.of` is :mod:`hashlib`; the grammar is the OCI image spec's
for the registered ``sha256`` algorithm (exactly 64 lowercase hex digits).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_composefs import (
    DigestError,
    DigestMismatchError,
    FormatError,
    InvalidDiffIdError,
    InvalidDigestError,
    InvalidNameError,
    Sha256Id,
    import_layer,
)
from trio_composefs.oci import Descriptor, parse_source, tag_image
from trio_composefs.repository import Repository

GOOD = "sha256:" + hashlib.sha256(b"hello").hexdigest()
BAD = [
    "",
    "sha256:",
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha256:" + "A" * 64,
    "sha256:" + "g" * 64,
    "sha512:" + "a" * 64,
    "SHA256:" + "a" * 64,
    "a" * 64,
    "sha256:" + "a" * 64 + "\n",
    " sha256:" + "a" * 64,
    "sha256:../../etc",
]


def test_parse_accepts_the_grammar() -> None:
    parsed = Sha256Id.parse(GOOD)
    assert parsed == GOOD
    assert isinstance(parsed, str)
    assert isinstance(parsed, Sha256Id)
    assert parsed.hex == hashlib.sha256(b"hello").hexdigest()
    assert parsed.digest_bytes() == hashlib.sha256(b"hello").digest()
    assert Sha256Id.from_hex(parsed.hex) == parsed
    assert {GOOD: 1}[parsed] == 1  # hashes as its text


@pytest.mark.parametrize("text", BAD)
def test_parse_refuses_with_one_error_type(text: str) -> None:
    with pytest.raises(InvalidDigestError, match="not a sha256 digest") as caught:
        Sha256Id.parse(text)
    # Also what each place raised before, so existing handlers keep working.
    assert isinstance(caught.value, DigestError | FormatError | InvalidNameError | ValueError)
    assert not isinstance(caught.value, DigestMismatchError)


def test_parse_error_message_can_name_the_place() -> None:
    with pytest.raises(InvalidDigestError, match=r"^manifest layer 3: bad 'x'$"):
        Sha256Id.parse("x", error="manifest layer 3: bad 'x'")


@given(st.binary(max_size=4096))
def test_of_matches_hashlib_and_parses(data: bytes) -> None:
    ident = Sha256Id.of(data)
    assert ident == "sha256:" + hashlib.sha256(data).hexdigest()
    assert Sha256Id.parse(str(ident)) == ident


@given(st.text(max_size=80))
def test_parse_agrees_with_the_grammar(text: str) -> None:
    hexd = text.removeprefix("sha256:")
    valid = (
        text.startswith("sha256:")
        and len(hexd) == 64
        and all(c in "0123456789abcdef" for c in hexd)
    )
    if valid:
        assert Sha256Id.parse(text) == text
    else:
        with pytest.raises(InvalidDigestError):
            Sha256Id.parse(text)


# ------------------------------------------------------------ the places that take one


def test_descriptor_digest_is_typed_and_checked() -> None:
    desc = Descriptor.from_json(
        {"mediaType": "application/octet-stream", "digest": GOOD, "size": 5}, where="x"
    )
    assert isinstance(desc.digest, Sha256Id)
    with pytest.raises(InvalidDigestError, match="x: unsupported or malformed digest"):
        Descriptor.from_json(
            {"mediaType": "application/octet-stream", "digest": "md5:00", "size": 5}, where="x"
        )
    with pytest.raises(InvalidDigestError):
        Descriptor("application/octet-stream", "sha256:nothex", 5)


def test_reference_digest_is_typed_and_checked() -> None:
    ref = parse_source(f"oci:/some/layout@{GOOD}")
    assert isinstance(ref.digest, Sha256Id)
    assert ref.digest == GOOD
    with pytest.raises(InvalidDigestError, match="not a sha256 digest in"):
        parse_source("oci:/some/layout@sha256:1234")


async def test_diff_id_syntax_error_is_not_a_mismatch_first(repo: Repository) -> None:
    with pytest.raises(InvalidDigestError, match="not a layer diff_id") as caught:
        await import_layer(repo, [b""], "sha256:" + "A" * 64)
    # A deprecated compatibility base for one release (it was a DigestMismatchError).
    assert isinstance(caught.value, InvalidDiffIdError)


def test_tag_image_refuses_a_malformed_manifest_digest(repo: Repository) -> None:
    with pytest.raises(InvalidDigestError, match="not a sha256 digest"):
        tag_image(repo, "sha256:abc", "t")
