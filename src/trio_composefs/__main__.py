"""``python -m trio_composefs``: the same CLI as ``trio-cfsctl``."""

from .cli import main

if __name__ == "__main__":
    main()
