"""The layout's promises, checked on the source and on real processes:

- layers point down only (koclip never imports pipelines or jobs; pipelines never imports jobs),
  and no module imports itself back through others (every import counts, lazy ones too);
- only koclip/fs.py talks to fsspec; no module is far past 400 lines;
- the core library imports, builds an index and answers a text query with Beam unimportable,
  and `python -m pipelines.embed` without Beam says which extra to install, in one line.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("koclip", "pipelines", "jobs")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports anywhere in its file (a name imported from a package
    counts as its submodule when there is one)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_layers_point_down_only():
    below = {"koclip": ("pipelines", "jobs"), "pipelines": ("jobs",), "jobs": ()}
    wrong = [(name, target) for name, targets in GRAPH.items() for target in targets
             if target.split(".")[0] in below[name.split(".")[0]]]
    assert not wrong, wrong


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(GRAPH[node]):
            # a package's __init__ importing its own submodules is how packages are built, not a cycle
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle() is None, " -> ".join(_cycle())


def test_the_cycle_check_finds_a_cycle():
    GRAPH["koclip.fs"].add("koclip.store")  # store imports fs: now they import each other
    try:
        assert _cycle() is not None
    finally:
        GRAPH["koclip.fs"].discard("koclip.store")


def _imports_fsspec(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n.split(".")[0] == "fsspec" for n in names):
            return True
    return "url_to_fs" in path.read_text(encoding="utf-8") or '__import__("fsspec")' in path.read_text()


def test_only_the_storage_layer_touches_fsspec():
    assert _imports_fsspec(MODULES["koclip.fs"])  # the check can see an import
    offenders = [name for name, path in MODULES.items() if name != "koclip.fs" and _imports_fsspec(path)]
    assert not offenders, offenders


def test_no_module_is_far_past_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_pipelines_import_only_public_names_of_koclip():
    private = []
    for name, path in MODULES.items():
        if not name.startswith(("pipelines", "jobs")):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("koclip"):
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


# ---------------------------------------------------------------- without Beam


def _no_beam_env(tmp_path: Path) -> dict:
    """An environment in which `import apache_beam` fails, as on a core install."""
    blocker = tmp_path / "blocked" / "apache_beam"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('apache_beam is not installed (blocked by the test)')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT)])}


def test_core_library_works_without_beam(tmp_path, tiny_ckpt_dir):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import koclip, koclip.index, koclip.query, koclip.app.launcher, koclip.cli.main
        from koclip.query import search
        from koclip.checkpoint import load_checkpoint
        from koclip.encoders import checkpoint_encoders
        from koclip.store import Row, rows_to_table, write_shard
        from koclip.index import build_index

        ckpt = load_checkpoint({tiny_ckpt_dir!r})
        texts = ["빨간 사과", "고양이 얼굴", "노란 바나나"]
        vectors = np.asarray(checkpoint_encoders(ckpt, 4).texts(texts), dtype=np.float32)
        dim = vectors.shape[1]
        # each item's image embedding is its caption's: a text query must find its own caption's item
        rows = [Row(f"item-{{i}}", f"img-{{i}}.png", f"{{i:064x}}", 8, 8, [t], v, v[None])
                for i, (t, v) in enumerate(zip(texts, vectors))]
        table = rows_to_table(rows, ckpt.fingerprint, ckpt.config.to_dict(), dim)
        write_shard({str(tmp_path / "emb" / "shard-00000.parquet")!r}, table)
        build_index({str(tmp_path / "emb")!r}, {str(tmp_path / "index")!r})
        hits = search("고양이 얼굴", k=3, index={str(tmp_path / "index")!r}, model=ckpt)
        assert hits[0].id == "item-1", hits
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("apache_beam", "pipelines", "jobs"))
        assert not loaded, loaded
        print("ok", hits[0].id)
    """)
    done = subprocess.run([sys.executable, "-c", script], env=_no_beam_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok item-1"


@pytest.mark.parametrize("module", ["pipelines.embed", "pipelines.index"])
def test_pipelines_without_beam_name_the_extra(tmp_path, module):
    done = subprocess.run([sys.executable, "-m", module], env=_no_beam_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"{module}: error: ") and "koclip-index[pipeline]" in done.stderr
