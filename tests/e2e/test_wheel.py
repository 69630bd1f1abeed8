"""The built wheel, installed into a fresh virtualenv, works away from the checkout (SPEC §9).

The wheel is built from a copy of the sources (never in the checkout, whose ``build/``
could leak stale files into it), installed without extras (an SQLite-only install:
no asyncpg), and every command runs with its working folder outside the checkout, so
nothing can come from the repository instead of the installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_tools import protoc

from tests.e2e.helpers import SERVING

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "registry", "ingestor"]
PROTOS = ["polku/event/v1/event.proto", "polku/v1/plugin.proto"]
INSTALL_TIMEOUT = 100.0  # a cold pip cache fetches grpcio and SQLAlchemy
RUN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    home: Path  # a folder outside the checkout: every command's working folder

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def cli(self) -> str:
        return str(self.venv / "bin" / "polku-registry")

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=self.home,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )


def environment() -> dict[str, str]:
    """This environment without the registry's settings or a path into the checkout."""
    drop = ("POLKU_REGISTRY", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def checked(process: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert process.returncode == 0, f"{process.args} exited {process.returncode}:\n" + (
        process.stdout + process.stderr
    )
    return process


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from a copy of the sources and install it into a new virtualenv."""
    base = tmp_path_factory.mktemp("wheel")
    source, dist, home = base / "source", base / "dist", base / "home"
    home.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # This venv's setuptools builds it: no build dependencies fetched.
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    checked(
        subprocess.run(
            [*pip_wheel, "--quiet", "-w", str(dist), str(source)],
            cwd=home,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    )
    (wheel,) = dist.glob("polku_registry-*.whl")
    target = base / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    installed = Installed(wheel, target, home)
    # Its dependencies come from the package index pip is configured with.
    checked(
        subprocess.run(
            [installed.python, "-m", "pip", "install", "--quiet", str(wheel)],
            cwd=home,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    )
    return installed


def test_the_wheel_installs_registry_and_ingestor_only(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"registry", "ingestor"}
    assert "registry/migrations/script.py.mako" in names
    assert any(n.startswith("registry/migrations/versions/0001_") for n in names)
    assert {f"registry/proto/{name}" for name in PROTOS} <= set(names)
    license_files = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert len(license_files) == 1


def test_the_installed_package_is_the_wheels_not_the_checkout(installed):
    code = (
        "import importlib.metadata, registry, registry.migrations;"
        "print(registry.__file__);"
        "print(registry.migrations.__file__);"
        "print(registry.__version__);"
        "print(importlib.metadata.version('polku-registry'))"
    )
    module, migrations, version, metadata = checked(
        installed.run(installed.python, "-c", code)
    ).stdout.split()
    assert Path(module).is_relative_to(installed.venv)
    assert Path(migrations).is_relative_to(installed.venv)
    assert version == metadata
    assert installed.wheel.name.startswith(f"polku_registry-{version}-")


@pytest.mark.parametrize("module", ["migrations", "asyncpg"])
def test_no_top_level_migrations_and_no_asyncpg_without_the_extra(installed, module):
    result = installed.run(installed.python, "-c", f"import {module}")
    assert result.returncode != 0
    assert f"No module named '{module}'" in result.stderr


def test_a_postgresql_url_without_asyncpg_says_which_extra(installed):
    # Refused before any connection is tried: nothing listens on port 9 anyway.
    result = installed.run(installed.cli, "migrate", "--db", "postgresql://u@127.0.0.1:9/db")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'polku-registry[postgres]'" in lines[0]


def test_serve_runs_from_outside_the_checkout(installed, tmp_path):
    database = tmp_path / "registry.db"
    process = subprocess.Popen(
        [installed.cli, "serve", "--listen", "127.0.0.1:0", "--db", f"sqlite:///{database}"],
        cwd=installed.home,
        env=environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if SERVING.search(line):
                serving.set()
        serving.set()  # it ended: stop waiting

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(RUN_TIMEOUT), "no 'serving on' line:\n" + "\n".join(lines)
        addresses = [m.group(1) for line in lines if (m := SERVING.search(line))]
        assert addresses, "\n".join(lines)
        # A client call through the installed CLI: a new registry lists nothing.
        listed = checked(
            installed.run(installed.cli, "list", "--registry", addresses[0], "-o", "json")
        )
        assert listed.stdout.strip() == "[]"
    finally:
        process.terminate()
        try:
            code = process.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        reader.join(RUN_TIMEOUT)
        assert process.stdout is not None
        process.stdout.close()
    assert code == 0, "\n".join(lines)
    assert database.is_file()


def test_proto_out_writes_files_that_protoc_compiles(installed, tmp_path):
    out, generated = tmp_path / "protos", tmp_path / "generated"
    generated.mkdir()
    result = checked(installed.run(installed.cli, "proto", "--out", str(out)))
    for name in PROTOS:
        assert (out / name).read_bytes() == (ROOT / "proto" / name).read_bytes()
        assert str(out / name) in result.stdout
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{out}", f"-I{include}", f"--python_out={generated}", *PROTOS]
    assert protoc.main(args) == 0
    assert (generated / "polku" / "v1" / "plugin_pb2.py").is_file()
