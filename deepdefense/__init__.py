"""The ``deepdefense`` command line: ``cli.py`` dispatches, one module per subcommand under ``commands/``."""

from common import __version__

__all__ = ["__version__"]
