"""The bottom of the layers: the version, the device choice and waiting for a server to be ready. Imports
nothing of ours, so every package (``defense``, ``server``, ``clients``, ``measure``, the ``deepdefense``
command line) may use it."""

__version__ = "0.1.0"
