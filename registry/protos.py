"""The wire contract's ``.proto`` files, shipped inside the package (SPEC §9).

Node, grpcurl and other non-Python clients compile these; ``polku-registry proto
--out DIR`` writes them out with :func:`write_protos`. They are copies of the
repository's ``proto/`` (``scripts/gen_protos.py`` keeps them equal) and import each
other as ``polku/...``, so they are written under those paths. The well-known types
they import (``google/protobuf/empty.proto``, ``timestamp.proto``) come with protoc.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

_PACKAGE = "registry"
_FOLDER = "proto"


def shipped_protos() -> dict[PurePosixPath, bytes]:
    """Every shipped ``.proto`` by its import path (``polku/v1/plugin.proto``), sorted.

    Raises:
        OSError: the package's files cannot be read.
    """
    found: dict[PurePosixPath, bytes] = {}

    def walk(folder: Traversable, path: PurePosixPath) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, path / entry.name)
            elif entry.name.endswith(".proto"):
                found[path / entry.name] = entry.read_bytes()

    walk(files(_PACKAGE).joinpath(_FOLDER), PurePosixPath())
    return dict(sorted(found.items()))


def write_protos(out: Path) -> list[Path]:
    """Write every shipped ``.proto`` under ``out`` at its import path; return the files.

    ``out`` and the folders below it are made as needed; a file already there with
    the same name is replaced, and nothing else in ``out`` is touched. The list is
    sorted, e.g. ``[out/polku/event/v1/event.proto, out/polku/v1/plugin.proto]``.

    Raises:
        OSError: ``out`` (or a folder in it) is not a folder or cannot be written.
    """
    out.mkdir(parents=True, exist_ok=True)  # FileExistsError when it is a file
    written = []
    for name, content in shipped_protos().items():
        target = out.joinpath(*name.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        written.append(target)
    return written
