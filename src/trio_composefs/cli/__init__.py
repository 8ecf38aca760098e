"""The ``trio-cfsctl`` command line (layer L3, on top of everything).

``_app`` builds the parser and dispatches; ``_commands`` holds the command bodies;
``_format`` the text renderings.
"""

from ._app import main as main
from ._app import run as run
