"""Public test support for applications built on trio-composefs (like ``trio.testing``).

``FaultyRepository`` injects faults at named points of an import (the repository's
calls, the hash workers, decompression); ``FaultySource`` and ``FaultyStream`` fault the
bytes an image source delivers; ``ImportChecker`` asserts afterwards that nothing
half-written is visible and nothing leaked; ``sample_layers`` and
``write_sample_layout`` build a small image exercising every layer encoding;
``LocalRegistry`` runs a real registry on loopback; ``SimulatedVerityKernel`` stands in
for the fs-verity ioctls. The pytest plugin (:mod:`trio_composefs.testing.pytest_plugin`)
offers them as fixtures.

This package's ``__init__`` is lazy (PEP 562), like the root's: pytest loads the plugin
wherever trio-composefs is installed, and loading it must not import trio and the
importer for test runs that never use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _lazy

if TYPE_CHECKING:
    from ..repository._verity import SimulatedVerityKernel as SimulatedVerityKernel
    from ._checker import ImportChecker as ImportChecker
    from ._checker import LeakError as LeakError
    from ._checker import ProcessSnapshot as ProcessSnapshot
    from ._checker import published_names as published_names
    from ._faults import FaultPoint as FaultPoint
    from ._faults import FaultyRepository as FaultyRepository
    from ._faults import Gate as Gate
    from ._faults import open_fds as open_fds
    from ._registry import LocalRegistry as LocalRegistry
    from ._registry import RegistryUnavailable as RegistryUnavailable
    from ._registry import find_registry as find_registry
    from ._sample import SampleLayer as SampleLayer
    from ._sample import sample_layers as sample_layers
    from ._sample_image import SAMPLE_PLATFORM as SAMPLE_PLATFORM
    from ._sample_image import sample_layout_files as sample_layout_files
    from ._sample_image import write_sample_layout as write_sample_layout
    from ._source import FaultySource as FaultySource
    from ._source import FaultyStream as FaultyStream
    from ._source import StreamFault as StreamFault

_LAZY: dict[str, str] = {
    "SimulatedVerityKernel": "..repository._verity",
    "ImportChecker": "._checker",
    "LeakError": "._checker",
    "ProcessSnapshot": "._checker",
    "published_names": "._checker",
    "FaultPoint": "._faults",
    "FaultyRepository": "._faults",
    "Gate": "._faults",
    "open_fds": "._faults",
    "LocalRegistry": "._registry",
    "RegistryUnavailable": "._registry",
    "find_registry": "._registry",
    "SampleLayer": "._sample",
    "sample_layers": "._sample",
    "SAMPLE_PLATFORM": "._sample_image",
    "sample_layout_files": "._sample_image",
    "write_sample_layout": "._sample_image",
    "FaultySource": "._source",
    "FaultyStream": "._source",
    "StreamFault": "._source",
}

__all__ = [
    "FaultPoint",
    "FaultyRepository",
    "FaultySource",
    "FaultyStream",
    "Gate",
    "ImportChecker",
    "LeakError",
    "LocalRegistry",
    "ProcessSnapshot",
    "RegistryUnavailable",
    "SAMPLE_PLATFORM",
    "SampleLayer",
    "SimulatedVerityKernel",
    "StreamFault",
    "find_registry",
    "open_fds",
    "published_names",
    "sample_layers",
    "sample_layout_files",
    "write_sample_layout",
]


def __getattr__(name: str) -> object:
    return _lazy.load(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return _lazy.names(__name__, __all__)
