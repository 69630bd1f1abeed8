"""Alembic migrations of the registry database; run from code by :mod:`registry.migrate`."""
