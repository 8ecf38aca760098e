"""The one h11-style vocabulary shared by every sans-IO codec in :mod:`trio_composefs.formats`.

Each codec is fed input (``receive_data``/``receive_chunk``, then an end-of-input call) and
asked for its next result (``next_event``/``next_entry``). A result is either an *event*
(each codec has its own ``Event`` alias, events only) or one of the two sentinels here:

- :data:`NEED_DATA`: nothing more can be handed out until more input arrives;
- :data:`END`: the end of input was signalled and everything has been handed out. Asking
  again returns :data:`END` again.

Feeding input after the end of input was signalled raises
:class:`~trio_composefs.DataAfterEndError` in every codec. A codec that raised a format
error raises the same error again on every later call (sticky errors).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["END", "NEED_DATA", "Sentinel"]


class Sentinel(enum.Enum):
    """The two non-event results of a sans-IO codec's ``next_*`` method.

    An enum so that ``if event is NEED_DATA or event is END: ...`` narrows the type of
    ``event`` to the codec's ``Event`` for mypy.
    """

    NEED_DATA = "NEED_DATA"
    END = "END"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


#: More input is needed before anything else can be handed out.
NEED_DATA: Final = Sentinel.NEED_DATA
#: The end of input was signalled and everything has been handed out.
END: Final = Sentinel.END
