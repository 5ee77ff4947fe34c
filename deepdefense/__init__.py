"""DeepDefense, a defended ML-as-a-service inference server: one import name for the whole project.

The layers, bottom to top — ``deepdefense.common`` ← ``models`` ← ``defense`` ← ``server``; ``clients`` (HTTP
only); ``measure`` — are folders at the top of the repository; ``deepdefense/<layer>`` are links to them, which the
wheel stores as subpackages, so that installed the project is this one package and nothing else. The command line
lives here: ``cli.py`` dispatches, one module per subcommand under ``commands/``, shared flags in ``flags.py``.
"""

from deepdefense.common import __version__

__all__ = ["__version__"]
