"""Soak test of jobs.reindex: many consecutive runs over a source mutated at random, with kills.

  python -m bench.soak                       # 30 runs, local disk (writes bench/results/soak.json)
  python -m bench.soak --runs 10 --gcs       # on a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py)
  python -m bench.soak --seed 7 --kill-rate 0.5
  python -m bench.soak --concurrent 20 --gcs # overlapping runs instead (bench/results/soak-concurrent.json)

Before each run the source (a folder of PNGs with .txt captions) is mutated at random: images
added, recaptioned, replaced, deleted and renamed, and some made to fail their next read once
(a TimeoutError injected through koclip.faults). With probability --kill-rate the run is first
started in a separate process and SIGKILLed after a random step of jobs.reindex.STEPS; then the
run is made in full. After each run the invariants are checked (jobs.reindex_check: the live
store, the index and the state hold exactly the current items, once each, with their current
captions). At the end every injected fault has fired, so a last run must leave no dead letter:
a transient failure may delay an item, never lose it. Target: 0 violations, 0 items lost.

--concurrent N: N rounds of two jobs.reindex processes on one work dir and index, the second
started a random 0-3 s after the first, over a source changed before each round. Either both
finish one after the other, or one exits with the lock message (exit 2, naming the holder);
nothing else is allowed, and the invariants are checked after each round.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from bench.common import machine_info, print_table, write_json

DEFAULT_OUT = "bench/results/soak.json"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Source:
    """The folder being mutated, and a record of what it should hold."""

    def __init__(self, root: str, rng: random.Random, faults: str):
        from koclip import fs

        self.fs, self.root, self.rng, self.faults = fs, root, rng, faults
        self.next_seed = 0
        self.names: list[str] = []

    def _png(self) -> bytes:
        self.next_seed += 1
        pixels = np.random.default_rng(self.next_seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return buffer.getvalue()

    def _path(self, name: str, ext: str) -> str:
        return self.fs.join(self.root, f"{name}.{ext}")

    def add(self) -> None:
        name = f"img{self.next_seed:04d}"
        self.fs.write_many({self._path(name, "png"): self._png(),
                            self._path(name, "txt"): f"사진 {self.next_seed}".encode()})
        self.names.append(name)

    def mutate(self) -> dict[str, int]:
        """One random round of changes; returns how many of each kind."""
        counts = {"added": 0, "recaptioned": 0, "replaced": 0, "deleted": 0, "renamed": 0, "faulted": 0}
        for _ in range(self.rng.randint(1, 4)):
            kind = self.rng.choice(list(counts)) if len(self.names) > 3 else "added"
            if kind == "added":
                self.add()
            elif kind == "recaptioned":
                name = self.rng.choice(self.names)
                self.fs.write_bytes(self._path(name, "txt"), f"고친 캡션 {self.rng.random():.6f}".encode())
            elif kind == "replaced":
                self.fs.write_bytes(self._path(self.rng.choice(self.names), "png"), self._png())
            elif kind == "deleted":
                name = self.names.pop(self.rng.randrange(len(self.names)))
                self.fs.remove([self._path(name, "png"), self._path(name, "txt")])
            elif kind == "renamed":
                name = self.names.pop(self.rng.randrange(len(self.names)))
                new = f"{name}-r{self.next_seed}"
                self.next_seed += 1
                paths = {ext: (self._path(name, ext), self._path(new, ext)) for ext in ("png", "txt")}
                data = self.fs.cat_many([old for old, _ in paths.values()])
                self.fs.write_many({new_path: data[old] for old, new_path in paths.values()})
                self.fs.remove([old for old, _ in paths.values()])
                self.names.append(new)
            else:  # the item is changed, so it is read this run, and that read times out once
                from koclip import faults

                name = self.rng.choice(self.names)
                self.fs.write_bytes(self._path(name, "txt"), f"읽기 실패 {self.next_seed}".encode())
                self.next_seed += 1
                faults.inject_read_faults(self.faults, self._path(name, "png"))
            counts[kind] += 1
        return counts


def _argv(args, source: str, work: str, index: str) -> list[str]:
    return ["--source", source, "--work", work, "--index", index, "--model", args.model,
            "--unit-size", "4", "--batch-size", "4"]


def _killed_run(step: str, argv: list[str], env: dict) -> int:
    done = subprocess.run([sys.executable, "-m", "jobs.reindex_killed", step, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode not in (-signal.SIGKILL, 0):
        raise RuntimeError(f"the killed run failed before its kill:\n{done.stderr[-2000:]}")
    return done.returncode


def soak(args, root: str) -> dict:
    from jobs import reindex
    from jobs.reindex_check import violations
    from jobs.reindex_state import load_state
    from koclip import fs

    rng = random.Random(args.seed)
    faults_dir = tempfile.mkdtemp(prefix="koclip-faults-")
    os.environ["KOCLIP_FAULTS"] = faults_dir
    env = {**os.environ, "PYTHONPATH": ROOT}
    source_dir, work, index = fs.join(root, "source"), fs.join(root, "work"), fs.join(root, "index")
    source = Source(source_dir, rng, faults_dir)
    for _ in range(6):
        source.add()
    argv = _argv(args, source_dir, work, index)
    rows, total = [], {"runs": 0, "kills": 0, "retried": 0, "violations": 0}
    for run in range(args.runs):
        changes = source.mutate() if run else {"added": 6}
        started = time.perf_counter()
        killed = None
        if run and rng.random() < args.kill_rate:
            killed = rng.choice(reindex.STEPS)
            if _killed_run(killed, argv, env) == -signal.SIGKILL:
                total["kills"] += 1
            else:
                killed += " (nothing to do)"
        result = reindex.reindex(reindex.parse_args(argv))
        found = violations(source_dir, work, index)
        total["runs"] += 1
        total["retried"] += result.retried
        total["violations"] += len(found)
        rows.append({"run": run, "changes": changes, "killed_at": killed, "items": len(source.names),
                     "embedded": result.embedded, "dead_letters": result.dead_letters, "retried": result.retried,
                     "violations": found, "seconds": round(time.perf_counter() - started, 2)})
        print(f"run {run:2d}: {sum(changes.values())} changes, killed at {killed or '-'}: {result.summary()}; "
              f"{len(found)} violations", flush=True)
    final = reindex.reindex(reindex.parse_args(argv))  # every injected fault has fired by now
    lost = sorted(i for i, row in load_state(work).items() if row["status"] == "dead")
    final_violations = violations(source_dir, work, index)
    total["violations"] += len(final_violations)
    return {"rows": rows, "total": {**total, "lost": len(lost), "lost_ids": lost[:20],
                                     "final_retried": final.retried, "final_violations": final_violations}}


def concurrent(args, root: str) -> dict:
    from jobs.reindex_check import violations
    from koclip import fs

    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": ROOT}
    source_dir, work, index = fs.join(root, "source"), fs.join(root, "work"), fs.join(root, "index")
    source = Source(source_dir, rng, tempfile.mkdtemp(prefix="koclip-faults-"))
    for _ in range(6):
        source.add()
    command = [sys.executable, "-m", "jobs.reindex", *_argv(args, source_dir, work, index)]
    rows, total = [], {"rounds": 0, "locked_out": 0, "both_ran": 0, "other_outcome": 0, "violations": 0}
    for round_ in range(args.concurrent):
        if round_:
            source.add()
            source.fs.write_bytes(source._path(rng.choice(source.names), "txt"), f"캡션 {round_}".encode())
        offset = rng.uniform(0, 3)
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(offset)  # the random start offset under test, not a synchronisation
        second = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in (first, second)]
        codes = sorted(code for code, _ in outcomes)
        locked = [err for code, err in outcomes if code == 2 and "is locked by jobs.reindex" in err]
        if codes == [0, 2] and locked:
            kind = "locked_out"
        elif codes == [0, 0]:
            kind = "both_ran"
        else:
            kind = "other_outcome"
        found = violations(source_dir, work, index)
        total["rounds"] += 1
        total[kind] += 1
        total["violations"] += len(found)
        rows.append({"round": round_, "offset_seconds": round(offset, 2), "outcome": kind, "exit_codes": codes,
                     "lock_message": locked[0].strip().splitlines()[-1] if locked else None, "violations": found,
                     "stderr_tails": [err[-500:] for code, err in outcomes if code not in (0, 2)]})
        print(f"round {round_:2d}: offset {offset:.2f} s, {kind}, exits {codes}, {len(found)} violations",
              flush=True)
    return {"rows": rows, "total": total}


def _start_emulator() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # gcp-storage-emulator with GCS's generation preconditions added, which the locks rely on
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), "--host", "127.0.0.1",
                             "--port", str(port), "--default-bucket", "koclip-soak"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)  # waiting for a server to listen, not synchronising the code under test
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no gRPC probe per call (tests/conftest.py)
    return proc, "gs://koclip-soak/soak"


def main(argv=None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--kill-rate", type=float, default=0.3, help="share of runs killed first (default 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gcs", action="store_true", help="source, work dir and index on a GCS emulator")
    p.add_argument("--concurrent", type=int, default=0, metavar="N",
                   help="instead: N rounds of two overlapping runs (writes bench/results/soak-concurrent.json)")
    p.add_argument("--model", default=None, help="checkpoint (default: a tiny random one made here)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results path")
    args = p.parse_args(argv)
    logging_quiet()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from koclip.cli.main import main as koclip_main

            args.model = os.path.join(tmp, "model")
            koclip_main(["init", args.model, "--tiny", "tiny-bert-clip"])
        emulator, root = _start_emulator() if args.gcs else (None, os.path.join(tmp, "soak"))
        try:
            started = time.perf_counter()
            result = concurrent(args, root) if args.concurrent else soak(args, root)
        finally:
            if emulator is not None:
                emulator.terminate()
    total = result["total"]
    if args.concurrent:
        print_table(["rounds", "one locked out", "one after the other", "other outcomes", "violations", "seconds"],
                    [[total["rounds"], total["locked_out"], total["both_ran"], total["other_outcome"],
                      total["violations"], f"{time.perf_counter() - started:.0f}"]])
        out = args.out if args.out != DEFAULT_OUT else "bench/results/soak-concurrent.json"
        path = write_json(out, {"benchmark": "soak-concurrent", "machine": machine_info(),
                                "storage": "gcs" if args.gcs else "local", "seed": args.seed, **result})
        print(f"wrote {path}")
        return 0 if total["violations"] == 0 and total["other_outcome"] == 0 else 1
    print_table(["runs", "kills", "retried", "violations", "items lost", "seconds"],
                [[total["runs"], total["kills"], total["retried"], total["violations"], total["lost"],
                  f"{time.perf_counter() - started:.0f}"]])
    path = write_json(args.out, {"benchmark": "soak", "machine": machine_info(), "storage": "gcs" if args.gcs else "local",
                                 "seed": args.seed, "kill_rate": args.kill_rate, **result})
    print(f"wrote {path}")
    return 0 if total["violations"] == 0 and total["lost"] == 0 else 1


def logging_quiet() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "jax", "koclip", "jobs", "pipelines", "gcsfs"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
