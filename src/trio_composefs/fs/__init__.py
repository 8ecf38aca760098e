"""Filesystem trees and the composefs formats that describe them (pure, sans-IO).

``_tree`` is the model; the builders (layers → tree), the dumpfile codec and the EROFS
writer and reader live beside it.
"""

from ._dumpfile import escape as escape
from ._dumpfile import escape_optional as escape_optional
from ._dumpfile import escape_xattr as escape_xattr
from ._dumpfile import write_dumpfile as write_dumpfile
from ._dumpfile_parse import parse_dumpfile as parse_dumpfile
from ._layers import TreeBuilder as TreeBuilder
from ._layers import transform_for_oci as transform_for_oci
from ._layers import tree_from_layers as tree_from_layers
from ._tree import BlockDevice as BlockDevice
from ._tree import CharDevice as CharDevice
from ._tree import Directory as Directory
from ._tree import ExternalFile as ExternalFile
from ._tree import Fifo as Fifo
from ._tree import FileSystem as FileSystem
from ._tree import InlineFile as InlineFile
from ._tree import Inode as Inode
from ._tree import Leaf as Leaf
from ._tree import LeafContent as LeafContent
from ._tree import Socket as Socket
from ._tree import Stat as Stat
from ._tree import Symlink as Symlink
