"""Where images come from: ``ImageSource`` implementations (layer L2)."""

from ._docker import DockerArchiveSource as DockerArchiveSource
from ._docker import normalize_repo_tag as normalize_repo_tag
from ._layout import OciLayoutSource as OciLayoutSource
from ._oci_archive import OciArchiveSource as OciArchiveSource
from ._skopeo import SkopeoOptions as SkopeoOptions
from ._skopeo import SkopeoProxySource as SkopeoProxySource
from ._skopeo import SkopeoSource as SkopeoSource
from ._skopeo import find_skopeo as find_skopeo
