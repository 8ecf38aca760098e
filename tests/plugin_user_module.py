"""How an application tests its error handling with trio-composefs's pytest plugin.

Only the plugin's fixtures and ``trio_composefs.testing`` are used; run with pytest-trio
(``trio_mode = true``) and the plugin (loaded from its ``pytest11`` entry point, or with
``-p trio_composefs``).
"""

import errno

import pytest

from trio_composefs import ComposefsError, Repository
from trio_composefs.oci import ImageStats, open_source, parse_source, pull_image
from trio_composefs.testing import FaultyRepository, FaultySource, ImportChecker


async def pull(repository: Repository | FaultyRepository, reference: str) -> ImageStats:
    """The application's code under test: pull an image and tag it."""
    async with open_source(parse_source(reference)) as source:
        return await pull_image(repository, source, tag="app")


async def test_network_drop(
    tmp_repository: Repository, sample_layout: str, import_checker: ImportChecker
) -> None:
    source = FaultySource(open_source(parse_source(sample_layout)))
    source.fail(nth=1, after_bytes=10_000, errno=errno.ECONNRESET)  # the first layer opened
    with pytest.RaisesGroup(ConnectionResetError, flatten_subgroups=True):
        async with source:
            await pull_image(tmp_repository, source, tag="app")
    import_checker.assert_nothing_published()  # no manifest, config, tag or image
    await import_checker.assert_consistent()  # what is published (complete layers) is whole
    await pull(tmp_repository, sample_layout)  # the network is back


async def test_hash_worker_dies(
    faulty_repository: FaultyRepository, sample_layout: str, import_checker: ImportChecker
) -> None:
    faulty_repository.kill_hash_worker(nth=1)  # SIGKILL, half-way through its file
    with pytest.RaisesGroup(
        pytest.RaisesExc(ComposefsError, match="hash worker .* died"), flatten_subgroups=True
    ):
        await pull(faulty_repository, sample_layout)
    import_checker.assert_nothing_published()
    stats = await pull(faulty_repository, sample_layout)  # no hang; the next pull works
    assert stats.image is not None
    await import_checker.assert_consistent()


async def test_disk_full(
    faulty_repository: FaultyRepository, sample_layout: str, import_checker: ImportChecker
) -> None:
    faulty_repository.fail("write", nth=5, errno=errno.ENOSPC)  # the 5th object written
    with pytest.RaisesGroup(
        pytest.RaisesExc(OSError, check=lambda e: e.errno == errno.ENOSPC),
        flatten_subgroups=True,
    ):
        await pull(faulty_repository, sample_layout)
    import_checker.assert_nothing_published()
    await import_checker.assert_consistent()
    stats = await pull(faulty_repository, sample_layout)  # space is back
    assert stats.tag == "app"
