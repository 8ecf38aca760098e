"""Checking and cleaning a repository: fsck and gc (layer L2)."""

from ._fsck import FsckKind as FsckKind
from ._fsck import FsckProblem as FsckProblem
from ._fsck import FsckProgress as FsckProgress
from ._fsck import FsckReport as FsckReport
from ._fsck import fsck as fsck
from ._fsck import stray_tmpfiles as stray_tmpfiles
from ._gc import GcResult as GcResult
from ._gc import gc as gc
