"""The ``classify`` command-line client: classify images, list models, check health, generate load (bench).

Modules: ``cli`` (argument parsing and the commands), ``connection`` (channels, TLS, unreachable-server
messages; shared with ``bench``), ``inputs`` (files, folders, globs and stdin to a list of images),
``requests`` (concurrent multi-image Classify calls with per-image errors), ``output`` (tables, JSON Lines).
Nothing is imported here, so ``classify health`` starts quickly.
"""

__all__: list[str] = []
