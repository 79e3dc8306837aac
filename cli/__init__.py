"""The ``mosa-retrofit`` command line: a thin layer over the typed Python API.

Installed as the package ``mosa_retrofit.cli`` (see ``pyproject.toml``); each subcommand lives in its own
module with ``add_parser(subparsers)`` and ``run(args)``.
"""
