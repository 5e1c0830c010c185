"""Shared fixtures: small checkpoints, and a GCS API emulator on 127.0.0.1 for gs:// paths."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# gcsfs otherwise probes for a gRPC endpoint and waits ~60 s per call against an emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# One XLA compilation cache for the run, shared by every test, pytest-xdist worker and subprocess
# (they inherit the environment): many tests jit the same tiny models' programs, and compiling
# them again was much of their time. Set before any test imports jax; removed by the process
# that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache = tempfile.mkdtemp(prefix="koclip-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"GCS emulator exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            try:  # doubles as the pause between attempts and the check for an early exit
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
    raise RuntimeError("GCS emulator did not start listening in time")


@pytest.fixture(scope="session")
def gcs_emulator():
    """A gcp-storage-emulator server on loopback; yields its URL and points gcsfs at it."""
    pytest.importorskip("gcp_storage_emulator", reason="pip install -e '.[dev]' brings the GCS emulator")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--in-memory", "--default-bucket", "koclip-test"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
    """A fresh gs:// prefix in the emulator's bucket, unique to the test."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    return f"gs://koclip-test/{name}-{time.monotonic_ns()}"


@pytest.fixture(scope="session")
def gcs_emulator_with_preconditions():
    """The same emulator with GCS's generation preconditions added (tests/gcs_emulator.py says why);
    yields its URL. Tests reach it through `gcs_lock_bucket`."""
    pytest.importorskip("gcp_storage_emulator", reason="pip install -e '.[dev]' brings the GCS emulator")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"),
                             "--host", "127.0.0.1", "--port", str(port), "--default-bucket", "koclip-test"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def gcs_lock_bucket(gcs_emulator_with_preconditions, request, monkeypatch):
    """A fresh gs:// prefix on the emulator that honours preconditions; STORAGE_EMULATOR_HOST points
    at it for this test (and the processes it starts)."""
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator_with_preconditions)
    gcsfs.GCSFileSystem.clear_instance_cache()
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    yield f"gs://koclip-test/{name}-{time.monotonic_ns()}"
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Keep what tests build (tokenizers, tiny models) out of the user's ~/.cache/koclip."""
    old = os.environ.get("KOCLIP_CACHE")
    os.environ["KOCLIP_CACHE"] = str(tmp_path_factory.mktemp("koclip-cache"))
    yield
    if old is None:
        os.environ.pop("KOCLIP_CACHE", None)
    else:
        os.environ["KOCLIP_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory):
    """A tiny random-init checkpoint with a small vocabulary, made by `koclip init --tiny`."""
    from koclip.cli.main import main

    out = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    assert main(["init", out, "--tiny", "tiny-bert-clip"]) == 0
    return out
