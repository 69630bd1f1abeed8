"""``polku-registry``: run the registry, migrate its database, and manage plugins.

Options read an environment variable, ``POLKU_REGISTRY_<OPTION>`` (``--registry``
reads ``POLKU_REGISTRY``): the command line beats the environment, which beats the
default. The filters and targets of client commands (``--name``, ``--source``,
``--type``, ``--status``, ``-l``) read none: a variable left over from a ``register``
must not quietly narrow a ``list`` (SPEC §9). Exit status: 0 success, 1 a runtime
error (one line on stderr), 2 a usage error, 130 interrupted.

- :mod:`~registry.cli.app`: the command table and :func:`main`
- :mod:`~registry.cli.parser`: options that fall back on the environment, value types
- :mod:`~registry.cli.serve`: ``serve`` and ``migrate``
- :mod:`~registry.cli.commands`: the client commands (``list``, ``register``, ...)
- :mod:`~registry.cli.follow`: ``watch``, which reconnects and resumes
- :mod:`~registry.cli.signals`: SIGINT and SIGTERM end ``serve`` and ``watch``
"""

from registry.cli.app import build_parser, main
from registry.cli.parser import CliError, UsageError

__all__ = ["CliError", "UsageError", "build_parser", "main"]
