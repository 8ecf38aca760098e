"""Public test support for applications built on trio-composefs (like ``trio.testing``).

``FaultyRepository`` injects faults at named points of an import (the repository's
calls, the hash workers, decompression); ``FaultySource`` and ``FaultyStream`` fault the
bytes an image source delivers; ``ImportChecker`` asserts afterwards that nothing
half-written is visible and nothing leaked; ``sample_layers`` and
``write_sample_layout`` build a small image exercising every layer encoding;
``LocalRegistry`` runs a real registry on loopback; ``SimulatedVerityKernel`` stands in
for the fs-verity ioctls. The pytest plugin (:mod:`trio_composefs.testing.pytest_plugin`)
offers them as fixtures.
"""

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
