"""``python -m registry``: the ``polku-registry`` command line."""

from registry.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
