"""The ``.proto`` files the package ships: equal to ``proto/``, written out whole, compilable."""

from __future__ import annotations

import importlib.util
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest
from grpc_tools import protoc

from registry.protos import shipped_protos, write_protos

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
SHIPPED = ROOT / "registry" / "proto"
NAMES = [PurePosixPath("polku/event/v1/event.proto"), PurePosixPath("polku/v1/plugin.proto")]


def tree(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_copies_equal_proto():
    shipped, source = tree(SHIPPED), tree(PROTO_DIR)
    assert sorted(shipped) == sorted(source)
    changed = [name for name in source if shipped[name] != source[name]]
    assert changed == [], "run: python scripts/gen_protos.py"


def test_the_generator_copies_proto_whole(tmp_path):
    dest = tmp_path / "proto"
    (dest / "polku" / "old").mkdir(parents=True)
    (dest / "polku" / "old" / "gone.proto").write_text("stale")
    load_generator().copy_protos(dest)
    assert tree(dest) == tree(PROTO_DIR)


def test_shipped_protos_are_read_from_the_package():
    protos = shipped_protos()
    assert list(protos) == NAMES
    for name, content in protos.items():
        assert content == (PROTO_DIR / name).read_bytes()


def test_write_protos_keeps_the_import_paths(tmp_path):
    out = tmp_path / "out" / "deeper"
    written = write_protos(out)
    assert written == [out / name for name in NAMES]
    assert tree(out) == tree(PROTO_DIR)


def test_write_protos_replaces_its_files_and_leaves_the_rest(tmp_path):
    mine = tmp_path / "mine.proto"
    mine.write_text("mine")
    target = tmp_path / "polku" / "v1" / "plugin.proto"
    target.parent.mkdir(parents=True)
    target.write_text("old")
    write_protos(tmp_path)
    assert target.read_bytes() == (PROTO_DIR / "polku/v1/plugin.proto").read_bytes()
    assert mine.read_text() == "mine"


def test_write_protos_into_a_file_raises(tmp_path):
    out = tmp_path / "a-file"
    out.write_text("")
    with pytest.raises(FileExistsError):
        write_protos(out)


def test_the_written_files_compile(tmp_path):
    protos, generated = tmp_path / "protos", tmp_path / "gen"
    generated.mkdir()
    write_protos(protos)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{protos}", f"-I{include}", f"--python_out={generated}"]
    assert protoc.main([*args, *map(str, NAMES)]) == 0
    assert (generated / "polku" / "v1" / "plugin_pb2.py").is_file()
    assert (generated / "polku" / "event" / "v1" / "event_pb2.py").is_file()
