"""Public test support for applications built on trio-composefs (like ``trio.testing``).

``FaultyRepository`` injects faults at named points of an import; ``sample_layers`` and
``write_sample_layout`` build a small image exercising every layer encoding;
``SimulatedVerityKernel`` stands in for the fs-verity ioctls.
"""

from ..repository._verity import SimulatedVerityKernel as SimulatedVerityKernel
from ._faults import FaultPoint as FaultPoint
from ._faults import FaultyRepository as FaultyRepository
from ._faults import Gate as Gate
from ._faults import open_fds as open_fds
from ._sample import SampleLayer as SampleLayer
from ._sample import sample_layers as sample_layers
from ._sample_image import SAMPLE_PLATFORM as SAMPLE_PLATFORM
from ._sample_image import sample_layout_files as sample_layout_files
from ._sample_image import write_sample_layout as write_sample_layout
