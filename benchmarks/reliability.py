"""Reliability campaign: kill -9 and --resume, damaged checkpoints, concurrent runs, fuzzed flags.

Every trial runs ``python -m popvec`` in a child process (PYTHONPATH = ``--source``, so the same
script measures an older checkout too) with tiny settings on CPU (digits, mlp, one thread), and
has a pass/fail oracle and a finding:

* ``kill``: SIGKILL at a seeded random delay (one trial per command also right after
  ``config.json`` appears, before the first checkpoint), then ``--resume`` (a fresh rerun when
  the folder holds no run yet). PASS iff it exits 0, leaves no lock or temp file, and its results
  (every JSON/CSV file less timing fields, winner and snapshot tensors bit for bit) equal an
  uninterrupted reference run. lmc (not resumable): no ``lmc.json`` or a complete one, and a rerun
  into a fresh folder matches.
* ``corrupt``: the checkpoint a resume reads gets a flipped bit, is truncated or emptied, or is
  replaced by a foreign torch file, random bytes (both with a valid sha256 sidecar) or the
  checkpoint of another run (lmc: its input winner.pt). PASS iff the command exits non-zero with
  one stderr line naming the file, no traceback, and the folder is unchanged.
* ``concurrent``: two runs on one ``--out`` started together, a second new run or a ``--resume``
  while the first runs (paused with SIGSTOP until the second is answered), a stale lock of a dead
  pid. PASS iff exactly one runs, the other is refused in one line (naming the lock holder's pid
  when the lock refused it), and the folder equals a solo run; a stale lock is taken over.
* ``fuzz``: hypothesis draws argv from each command's real flags (random values, NaN/inf/negative/
  huge/empty/wrong types, unknown flags, odd paths, ``--resume`` of odd folders) after safe tiny
  defaults. PASS iff exit 0, or exit 1/2 with at most 4 stderr lines and no traceback, within the
  per-trial timeout (a timeout counts as passed only when a flag asks for a long run).

The oracle for a raw traceback is ``Traceback (most recent call last)`` on stderr. Prints a table
(category, trials, passed, worst finding) and writes JSON (default
``benchmarks/results/reliability-cpu.json``). Usage::

    python benchmarks/reliability.py                      # 10.5 minutes on 2 shared cores (load average 5-7)
    python benchmarks/reliability.py --quick              # one trial per category and command
    python benchmarks/reliability.py --source OLD_CHECKOUT --json before.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "reliability-cpu.json"
TRACEBACK = "Traceback (most recent call last)"
RESUMABLE = ("train", "instability", "hyperband", "pbt", "warmstart")
COMMANDS = (*RESUMABLE, "lmc")
CATEGORIES = ("kill", "corrupt", "concurrent", "fuzz")
BASE = ["--device", "cpu", "--no-progress", "--seed", "0", "--model", "mlp", "--batch-size", "64"]
#: Tiny settings: each run takes about 3 s on an idle core, half of it imports.
TINY: dict[str, list[str]] = {
    "train": [*BASE, "--num-models", "4", "--num-elim-steps", "10", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05"],
    "instability": [*BASE, "--k1", "0,5,10", "--k2", "20", "--copies", "2", "--alphas", "3", "--no-plots"],
    "hyperband": [*BASE, "--max-t", "9", "--grace-period", "1", "--reduction-factor", "3", "--unit-steps", "2", "--no-plots"],
    "pbt": [*BASE, "--num-models", "4", "--perturbation-interval", "5", "--steps", "30", "--no-plots"],
    "warmstart": [*BASE, "--chunks", "3", "--max-steps", "20", "--check-every", "5", "--replicates", "1", "--no-plots"],
}
#: A second configuration of each command whose checkpoint has other shapes ("a checkpoint of another run").
OTHER = {
    "train": ["--num-models", "3"],
    "instability": ["--k1", "0,5"],
    "hyperband": ["--max-t", "3"],
    "pbt": ["--num-models", "3"],
    "warmstart": ["--replicates", "2"],
}
LMC = ["--model", "mlp", "--device", "cpu", "--alphas", "5", "--no-plots"]
#: Files a resume reads, first found wins (instability: the branches once they exist, else the trunk).
RESUME_CHECKPOINTS = ("checkpoint.pt", "branches.pt", "trunk.pt")
TIME_KEYS = ("time_s", "seconds", "elapsed", "started", "finished", "timestamp")
MEMORY_LIMIT = 6 * 2**30  # address space of each child: a runaway allocation fails instead of swapping the machine


# --------------------------------------------------------------------------- running popvec
@dataclasses.dataclass
class Run:
    rc: int | None
    stdout: str
    stderr: str
    wall: float
    timed_out: bool = False

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stderr

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def last_err(self) -> str:
        lines = self.err_lines
        return clip(lines[-1]) if lines else "(no stderr)"


def clip(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


class Popvec:
    """Starts ``python -m popvec`` children against one source tree."""

    def __init__(self, source: Path, work: Path):
        self.source = source
        self.work = work
        self.env = {
            **os.environ,
            "PYTHONPATH": str(source),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "COLUMNS": "200",
            "PYTHONHASHSEED": "0",
        }
        self.env.pop("PYTHONWARNINGS", None)

    @staticmethod
    def _limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        os.setsid()

    def start(self, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[str]:
        cwd = cwd or self.work
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [sys.executable, "-m", "popvec", *argv],
            cwd=cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            preexec_fn=self._limits,
        )

    def finish(self, proc: subprocess.Popen[str], started: float, timeout: float | None = 300) -> Run:
        """Wait for ``proc``; its output with the scratch folder's path left out (findings name paths inside it)."""
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            out, err = proc.communicate()
            timed_out = True
        scratch = f"{self.work}/"
        return Run(
            None if timed_out else proc.returncode,
            out.replace(scratch, ""),
            err.replace(scratch, ""),
            time.monotonic() - started,
            timed_out,
        )

    def run(self, argv: list[str], cwd: Path | None = None, timeout: float | None = 300) -> Run:
        started = time.monotonic()
        return self.finish(self.start(argv, cwd), started, timeout)


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the child (and anything it started: it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], limit: float = 120) -> bool:
    """Poll until ``ready()``; False when the process ended (or the limit passed) first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return ready()
        time.sleep(0.005)
    return False


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- what a run folder holds
def _drop_times(value: Any, folder: str) -> Any:
    if isinstance(value, dict):
        return {k: _drop_times(v, folder) for k, v in value.items() if not any(k.endswith(t) for t in TIME_KEYS)}
    if isinstance(value, list):
        return [_drop_times(v, folder) for v in value]
    if isinstance(value, str):
        return value.replace(folder, "<RUN>")
    return value


def _tensor_digest(value: Any, h: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(f"K{k!r}".encode())
            _tensor_digest(value[k], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _tensor_digest(v, h)
    else:
        h.update(repr(value).encode())


def results_of(folder: Path) -> dict[str, str]:
    """A digest per result file: JSON/CSV less timing fields and the folder path, tensors of .pt files bit for bit.

    The resume checkpoints themselves (they hold wall times and RNG states) count only by name.
    """
    digests: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == ".lock":
            continue
        name = str(path.relative_to(folder))
        if path.name.endswith(".sha256") or path.name in RESUME_CHECKPOINTS or path.name == "config.json":
            digests[name] = "present"
            continue
        h = hashlib.sha256()
        try:
            if path.suffix == ".json":
                h.update(json.dumps(_drop_times(json.loads(path.read_text()), str(folder)), sort_keys=True).encode())
            elif path.suffix == ".csv":
                rows = [line.split(",") for line in path.read_text().splitlines()]
                keep = [i for i, c in enumerate(rows[0] if rows else []) if not any(c.endswith(t) for t in TIME_KEYS)]
                h.update(repr([[r[i] for i in keep if i < len(r)] for r in rows]).encode())
            elif path.suffix == ".pt":
                _tensor_digest(torch.load(io.BytesIO(path.read_bytes()), weights_only=True, map_location="cpu"), h)
            else:
                h.update(path.read_bytes())
        except Exception as err:  # an unreadable result file is a finding, not a crash of the campaign
            digests[name] = f"unreadable: {clip(str(err), 60)}"
            continue
        digests[name] = h.hexdigest()
    return digests


def diff(got: dict[str, str], want: dict[str, str]) -> str:
    """'' when equal, else the first differences in words."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    parts = []
    if changed:
        parts.append("differs: " + ", ".join(changed[:3]))
    if missing:
        parts.append("missing: " + ", ".join(missing[:3]))
    if extra:
        parts.append("extra: " + ", ".join(extra[:3]))
    return "; ".join(parts)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock too) with the sha256 of its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.name == ".lock" or (p.name.startswith(".") and p.name.endswith(".tmp"))
    ]


def resume_checkpoint(folder: Path) -> Path | None:
    for name in RESUME_CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    return None


def write_sidecar(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


KINDS = ("bit-flip", "truncated", "empty", "foreign-torch", "random-bytes", "other-run")


def corrupt(path: Path, kind: str, other: Path, rng: random.Random) -> None:
    """Damage checkpoint ``path`` in one of :data:`KINDS` (``other``: a genuine checkpoint of another run)."""
    data = path.read_bytes()
    if kind == "bit-flip":
        buf = bytearray(data)
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(buf))
    elif kind == "truncated":
        path.write_bytes(data[: rng.randrange(1, len(data))])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign-torch":  # a valid torch file with a valid sha256 sidecar, not popvec's
        torch.save({"weights": torch.randn(3, 4), "step": 7}, path)
        write_sidecar(path)
    elif kind == "random-bytes":  # with a valid sidecar too: the content check, not the checksum, must catch it
        path.write_bytes(rng.randbytes(len(data)))
        write_sidecar(path)
    elif kind == "other-run":  # a genuine checkpoint (and sidecar, where the source writes them) of another run of other shapes
        shutil.copyfile(other, path)
        if Path(f"{other}.sha256").is_file():
            shutil.copyfile(f"{other}.sha256", f"{path}.sha256")
    else:
        raise ValueError(f"unknown corruption {kind!r}")


# --------------------------------------------------------------------------- trials
@dataclasses.dataclass
class Trial:
    category: str
    command: str
    name: str
    passed: bool
    finding: str
    severity: int = 0  # of a failure: 4 wrong results that look right, 3 traceback/crash/hang, 2 wrong outcome, 1 message shape
    wall_s: float = 0.0


def refusal_problem(run: Run, must_name: Iterable[str] = ()) -> tuple[int, str]:
    """(severity, problem) of a run that must be refused in one line without a traceback; (0, '') when it was."""
    if run.timed_out:
        return 3, "hung (timeout)"
    if run.traceback:
        return 3, f"traceback (exit {run.rc}): {run.last_err()}"
    if run.rc == 0:
        return 2, "accepted (exit 0)"
    if run.rc is None or run.rc < 0:
        return 3, f"killed by signal {-(run.rc or 0)}"
    if len(run.err_lines) != 1:
        return 1, f"{len(run.err_lines)} stderr lines: {run.last_err()}"
    missing = [m for m in must_name if m not in run.stderr]
    if missing:
        return 1, f"does not name {missing[0]}: {run.last_err()}"
    return 0, ""


class Campaign:
    def __init__(self, pv: Popvec, rng: random.Random, n: int, commands: list[str], say: Callable[[str], None]):
        self.pv, self.rng, self.n, self.commands, self.say = pv, rng, n, commands, say
        self.work = pv.work
        self.reference: dict[str, Path] = {}
        self.reference_results: dict[str, dict[str, str]] = {}
        self.reference_wall: dict[str, float] = {}
        self.other: dict[str, Path] = {}
        self.interrupted: dict[str, Path] = {}
        self.trials: list[Trial] = []
        self.counter = 0
        self.quick = False

    def fresh(self, tag: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:04d}-{tag}"

    def argv(self, command: str, out: Path) -> list[str]:
        if command == "lmc":
            return ["lmc", *LMC, str(self.lmc_a), str(self.lmc_b), "--out", str(out)]
        return [command, *TINY[command], "--out", str(out)]

    def record(self, trial: Trial) -> None:
        trial.finding = trial.finding.replace(f"{self.work}/", "")  # scratch paths shown relative to the scratch folder
        self.trials.append(trial)
        mark = "pass" if trial.passed else "FAIL"
        self.say(f"  {mark} {trial.category:<10} {trial.command:<11} {trial.name:<22} {trial.wall_s:5.1f}s {trial.finding}")

    # ----------------------------------------------------------------- references
    def prepare(self) -> None:
        """A solo reference run per command, one of another configuration, and a folder interrupted after its first checkpoint."""
        for command in [c for c in RESUMABLE if c in self.commands or (c == "train" and "lmc" in self.commands)]:
            self.reference_run(command)
        if "lmc" in self.commands:
            self.reference_run("lmc")
        for command in [c for c in RESUMABLE if c in self.commands]:
            self.other_run(command)
            self.interrupted[command] = self.interrupt(command)

    def _solo(self, tag: str, argv: list[str]) -> Run:
        run = self.pv.run(argv)
        if run.rc != 0:
            raise SystemExit(f"{tag} failed (exit {run.rc}): {run.last_err()}")
        return run

    def reference_run(self, command: str) -> None:
        """The uninterrupted solo run every trial of ``command`` is compared with (lmc: between two train winners)."""
        if command == "lmc":
            if "train" not in self.reference:
                self.reference_run("train")
            other = self.fresh("ref-train-seed1")
            self._solo("a second train run", ["train", *TINY["train"], "--seed", "1", "--out", str(other)])
            self.lmc_a, self.lmc_b = self.reference["train"] / "winner.pt", other / "winner.pt"
        folder = self.fresh(f"ref-{command}")
        run = self._solo(f"the reference run of {command}", self.argv(command, folder))
        self.reference[command], self.reference_wall[command] = folder, run.wall
        self.reference_results[command] = results_of(folder)
        self.say(f"reference {command}: {run.wall:.1f}s, {len(self.reference_results[command])} files")

    def other_run(self, command: str) -> None:
        folder = self.fresh(f"other-{command}")
        self._solo(f"the other run of {command}", [command, *TINY[command], *OTHER[command], "--out", str(folder)])
        self.other[command] = folder

    def checkpointed(self, folder: Path) -> bool:
        """Whether the first checkpoint is on disk (with its sha256 sidecar, for a source that writes them)."""
        path = resume_checkpoint(folder)
        sidecars = any(any(ref.glob("*.sha256")) for ref in self.reference.values())
        return path is not None and (not sidecars or Path(f"{path}.sha256").is_file())

    def interrupt(self, command: str) -> Path:
        """A run of ``command`` killed (-9) right after its first checkpoint, its stale lock and temp files removed."""
        folder = self.fresh(f"interrupted-{command}")
        proc = self.pv.start(self.argv(command, folder))
        ok = wait_for(proc, lambda: self.checkpointed(folder))
        kill(proc)
        proc.communicate()
        if not ok or (folder / "summary.json").exists() or (folder / "instability.json").exists():
            self.say(f"note: {command} could not be interrupted between checkpoints (ok={ok})")
        for left in [folder / ".lock", *folder.rglob(".*.tmp")]:  # a clean interrupted state: no lock, no half-written file
            left.unlink(missing_ok=True)
        return folder

    # ----------------------------------------------------------------- a. kill -9
    def kill_trials(self, command: str) -> None:
        plans: list[tuple[str, float | str]] = [] if self.quick and command != "lmc" else [("before-checkpoint", "config")]
        if command != "lmc":
            plans.append(("after-first-checkpoint", "checkpoint"))
        span = self.reference_wall[command]
        plans += [(f"random {d:.2f}s", d) for d in (self.rng.uniform(0.3, span) for _ in range(self.n))]
        for name, delay in plans:
            started = time.monotonic()
            trial = self.lmc_kill(name, delay) if command == "lmc" else self.kill_resume(command, name, delay)
            trial.wall_s = time.monotonic() - started
            self.record(trial)

    def kill_resume(self, command: str, name: str, delay: float | str) -> Trial:
        """SIGKILL ``command`` after ``delay`` seconds, or once "config" (config.json) or "checkpoint" (the first
        checkpoint and its sidecar) appears; then --resume (or rerun when no run was recorded) and compare."""
        folder = self.fresh(f"kill-{command}")
        proc = self.pv.start(self.argv(command, folder))
        if delay == "config":
            wait_for(proc, lambda: (folder / "config.json").exists(), limit=120)
        elif delay == "checkpoint":
            wait_for(proc, lambda: self.checkpointed(folder), limit=120)
        else:
            time.sleep(float(delay))
        finished_first = proc.poll() is not None
        kill(proc)
        proc.communicate()
        ckpt = resume_checkpoint(folder)
        where = "after the end" if finished_first else ("after a checkpoint" if ckpt else "before any checkpoint")
        if (folder / "config.json").is_file():
            run = self.pv.run([command, "--resume", str(folder), "--no-progress"])
            how = "--resume"
        else:
            run = self.pv.run(self.argv(command, folder))
            how = "rerun"
        label = f"killed {where}, {how}"
        if run.timed_out or run.traceback or run.rc != 0:
            return Trial(
                "kill", command, name, False, f"{label}: exit {run.rc}: {run.last_err()}", 3 if run.traceback or run.timed_out else 2
            )
        mismatch = diff(results_of(folder), self.reference_results[command])
        if mismatch:
            return Trial("kill", command, name, False, f"{label}: results {mismatch}", 4)
        left = leftovers(folder)
        if left:
            return Trial("kill", command, name, False, f"{label}: left behind {', '.join(left)}", 2)
        return Trial("kill", command, name, True, f"{label}: equal to the reference")

    def lmc_kill(self, name: str, delay: float | str) -> Trial:
        folder = self.fresh("kill-lmc")
        proc = self.pv.start(self.argv("lmc", folder))
        if isinstance(delay, str):
            wait_for(proc, lambda: (folder / "config.json").exists(), limit=120)
        else:
            time.sleep(delay * 1.2)
        kill(proc)
        proc.communicate()
        table = folder / "lmc.json"
        if table.exists():
            got = results_of(folder).get("lmc.json")
            if got != self.reference_results["lmc"].get("lmc.json"):
                return Trial("kill", "lmc", name, False, f"a killed lmc left an incomplete or wrong lmc.json ({got})", 4)
        again = self.pv.run(self.argv("lmc", folder))  # into the same folder: may be refused, in one line
        if again.traceback or again.timed_out:
            return Trial("kill", "lmc", name, False, f"rerun into the same folder: exit {again.rc}: {again.last_err()}", 3)
        fresh = self.fresh("kill-lmc-rerun")
        rerun = self.pv.run(self.argv("lmc", fresh))
        if rerun.rc != 0:
            return Trial("kill", "lmc", name, False, f"rerun into a new folder: exit {rerun.rc}: {rerun.last_err()}", 3)
        mismatch = diff(results_of(fresh), self.reference_results["lmc"])
        if mismatch:
            return Trial("kill", "lmc", name, False, f"rerun results {mismatch}", 4)
        same = "reran" if again.rc == 0 else f"same folder refused ({clip(again.last_err(), 60)})"
        return Trial("kill", "lmc", name, True, f"{'lmc.json complete' if table.exists() else 'no lmc.json'}; {same}; new folder ok")

    # ----------------------------------------------------------------- b. damaged checkpoints
    def corrupt_trials(self, command: str) -> None:
        offset = self.rng.randrange(len(KINDS))
        for i in range(max(len(KINDS), self.n * 2) if self.n > 1 else 3):
            kind = KINDS[(offset + i) % len(KINDS)]
            started = time.monotonic()
            trial = self.corrupt_lmc(kind) if command == "lmc" else self.corrupt_resume(command, kind)
            trial.wall_s = time.monotonic() - started
            self.record(trial)

    def corrupt_resume(self, command: str, kind: str) -> Trial:
        folder = self.fresh(f"corrupt-{command}")
        shutil.copytree(self.interrupted[command], folder)
        target = resume_checkpoint(folder)
        if target is None:
            return Trial("corrupt", command, kind, False, "no checkpoint to damage (the run could not be interrupted)", 2)
        other = self.other[command] / target.name
        if not other.is_file():
            other = resume_checkpoint(self.other[command]) or other
        corrupt(target, kind, other, self.rng)
        before = snapshot(folder)
        run = self.pv.run([command, "--resume", str(folder), "--no-progress"])
        severity, problem = refusal_problem(run, [target.name])
        if run.rc == 0 and not run.traceback:
            mismatch = diff(results_of(folder), self.reference_results[command])
            severity, problem = (4, f"resumed from it (exit 0), results {mismatch}") if mismatch else (2, "resumed (exit 0), results equal")
        changed = diff(snapshot(folder), before)
        if not problem and changed:
            severity, problem = 2, f"refused but the folder changed: {changed}"
        if problem:
            return Trial("corrupt", command, kind, False, f"{target.name}: {problem}", severity)
        return Trial("corrupt", command, kind, True, f"refused: {clip(run.last_err(), 90)}")

    def corrupt_lmc(self, kind: str) -> Trial:
        inputs = self.fresh("corrupt-lmc")
        inputs.mkdir(parents=True)
        a = inputs / "a.pt"
        shutil.copyfile(self.lmc_a, a)
        if Path(f"{self.lmc_a}.sha256").is_file():
            shutil.copyfile(f"{self.lmc_a}.sha256", f"{a}.sha256")
        corrupt(a, kind, self.interrupted["train"] / "checkpoint.pt" if "train" in self.interrupted else self.lmc_b, self.rng)
        before = snapshot(inputs)
        out = inputs / "out"
        run = self.pv.run(["lmc", *LMC, str(a), str(self.lmc_b), "--out", str(out)])
        severity, problem = refusal_problem(run, [a.name])
        if run.rc == 0 and not run.traceback:
            severity, problem = (4 if kind != "other-run" else 2), "accepted the damaged file (exit 0)"
        if not problem and (out / "lmc.json").exists():
            severity, problem = 2, "refused but wrote lmc.json"
        changed = diff(snapshot(inputs), {**before, **snapshot(out)}) if not problem else ""
        if not problem and changed:
            severity, problem = 2, f"changed the inputs: {changed}"
        if problem:
            return Trial("corrupt", "lmc", kind, False, problem, severity)
        return Trial("corrupt", "lmc", kind, True, f"refused: {clip(run.last_err(), 90)}")

    # ----------------------------------------------------------------- c. concurrent runs
    def concurrent_trials(self, command: str) -> None:
        variants = ["together", "stale-lock"] if command == "lmc" else ["together", "second-new", "second-resume", "stale-lock"]
        count = len(variants) if self.n > 1 else 2
        for i in range(count):
            variant = variants[i % len(variants)]
            started = time.monotonic()
            trial = getattr(self, "concurrent_" + variant.replace("-", "_"))(command)
            trial.wall_s = time.monotonic() - started
            self.record(trial)

    def _pair_outcome(self, command: str, name: str, folder: Path, first: tuple[subprocess.Popen[str], Run], second: Run) -> Trial:
        (proc_a, a), b = first, second
        runs = [(proc_a.pid, a), (-1, b)]
        ok = [r for _, r in runs if r.rc == 0 and not r.traceback]
        if any(r.traceback or r.timed_out for _, r in runs):
            bad = next(r for _, r in runs if r.traceback or r.timed_out)
            return Trial("concurrent", command, name, False, f"traceback or hang (exit {bad.rc}): {bad.last_err()}", 3)
        if len(ok) != 1:
            codes = ", ".join(str(r.rc) for _, r in runs)
            sev = 4 if len(ok) == 2 else 2
            return Trial(
                "concurrent", command, name, False, f"{len(ok)} of 2 ran (exits {codes}): {b.last_err() if b.rc else a.last_err()}", sev
            )
        refused = b if a.rc == 0 else a
        holder = proc_a.pid if a.rc == 0 else None
        names_holder = holder is not None and f"pid {holder}" in refused.stderr
        if len(refused.err_lines) != 1 or not (names_holder or "in use" in refused.stderr or "already holds a run" in refused.stderr):
            return Trial("concurrent", command, name, False, f"refusal unclear: {refused.last_err()}", 1)
        mismatch = diff(results_of(folder), self.reference_results[command])
        if mismatch:
            return Trial("concurrent", command, name, False, f"the folder is not a solo run: {mismatch}", 4)
        if leftovers(folder):
            return Trial("concurrent", command, name, False, f"left behind {', '.join(leftovers(folder))}", 2)
        return Trial("concurrent", command, name, True, f"one ran, the other refused: {clip(refused.last_err(), 80)}")

    def concurrent_together(self, command: str) -> Trial:
        folder = self.fresh(f"together-{command}")
        t0 = time.monotonic()
        pa, pb = self.pv.start(self.argv(command, folder)), self.pv.start(self.argv(command, folder))
        a, b = self.pv.finish(pa, t0), self.pv.finish(pb, t0)
        trial = self._pair_outcome(command, "together", folder, (pa, a), b)
        if trial.passed:
            refused, holder = (b, pa.pid) if a.rc == 0 else (a, pb.pid)
            if "in use" in refused.stderr and f"pid {holder}" not in refused.stderr:
                return Trial(
                    "concurrent", command, "together", False, f"refusal does not name the holder pid {holder}: {refused.last_err()}", 1
                )
        return trial

    def _second_while_running(self, command: str, name: str, ready: Callable[[Path], bool], second: Callable[[Path], list[str]]) -> Trial:
        folder = self.fresh(f"{name}-{command}")
        t0 = time.monotonic()
        pa = self.pv.start(self.argv(command, folder))
        if not wait_for(pa, lambda: ready(folder)) or pa.poll() is not None:
            a = self.pv.finish(pa, t0)
            return Trial(
                "concurrent", command, name, True, f"inconclusive: the first run ended (exit {a.rc}) before the second could start"
            )
        os.killpg(pa.pid, signal.SIGSTOP)  # the first run holds the folder, paused, until the second has its answer
        try:
            b = self.pv.run(second(folder))
        finally:
            os.killpg(pa.pid, signal.SIGCONT)
        running = pa.poll() is None
        a = self.pv.finish(pa, t0)
        trial = self._pair_outcome(command, name, folder, (pa, a), b)
        if trial.passed and "in use" in b.stderr and f"pid {pa.pid}" not in b.stderr:
            return Trial("concurrent", command, name, False, f"refusal does not name the holder pid {pa.pid}: {b.last_err()}", 1)
        if trial.passed and not running:
            trial.finding += " (the first had ended meanwhile)"
        return trial

    def concurrent_second_new(self, command: str) -> Trial:
        return self._second_while_running(command, "second-new", lambda f: (f / "config.json").exists(), lambda f: self.argv(command, f))

    def concurrent_second_resume(self, command: str) -> Trial:
        return self._second_while_running(
            command, "second-resume", lambda f: resume_checkpoint(f) is not None, lambda f: [command, "--resume", str(f), "--no-progress"]
        )

    def concurrent_stale_lock(self, command: str) -> Trial:
        folder = self.fresh(f"stale-{command}")
        if command == "lmc":
            folder.mkdir(parents=True)
            argv = self.argv(command, folder)
        else:
            shutil.copytree(self.interrupted[command], folder)
            argv = [command, "--resume", str(folder), "--no-progress"]
        pid = dead_pid()
        record = {"pid": pid, "host": socket.gethostname(), "command": f"popvec {command}", "started": "2026-01-01 00:00:00"}
        (folder / ".lock").write_text(json.dumps(record))
        run = self.pv.run(argv)
        if run.rc != 0 or run.traceback:
            return Trial(
                "concurrent",
                command,
                "stale-lock",
                False,
                f"a stale lock of dead pid blocked the run: exit {run.rc}: {run.last_err()}",
                3 if run.traceback else 2,
            )
        mismatch = diff(results_of(folder), self.reference_results[command])
        if mismatch:
            return Trial("concurrent", command, "stale-lock", False, f"results {mismatch}", 4)
        if leftovers(folder):
            return Trial("concurrent", command, "stale-lock", False, f"left behind {', '.join(leftovers(folder))}", 2)
        return Trial("concurrent", command, "stale-lock", True, "taken over; results equal the reference")

    # ----------------------------------------------------------------- d. fuzzed flags
    def fuzz_trials(self, command: str, examples: int, seed: int, timeout: float) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed

        spec = self.flag_specs()[command]
        strategy = argv_strategy(command, spec)

        @hseed(seed)
        @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(plan: tuple[str, list[str]]) -> None:
            started = time.monotonic()
            trial = self.fuzz_one(command, plan, timeout)
            trial.wall_s = time.monotonic() - started
            self.record(trial)

        one()

    _specs: dict[str, list[dict[str, Any]]] | None = None

    def flag_specs(self) -> dict[str, list[dict[str, Any]]]:
        """Every command's flags as the source tree's own parser defines them."""
        if self._specs is None:
            code = (
                "import json, argparse\n"
                "from popvec.cli.main import build_parser\n"
                "p = build_parser()\n"
                "sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))\n"
                "out = {}\n"
                "for name, sp in sub.choices.items():\n"
                "    out[name] = [dict(options=a.option_strings, dest=a.dest, choices=list(a.choices) if a.choices else None,\n"
                "                      switch=a.nargs == 0, type=getattr(a.type, '__qualname__', str(a.type)))\n"
                "                 for a in sp._actions if a.dest != 'help']\n"
                "print(json.dumps(out))\n"
            )
            proc = subprocess.run([sys.executable, "-c", code], env=self.pv.env, capture_output=True, text=True, check=True, cwd=self.work)
            self._specs = json.loads(proc.stdout)
        return self._specs

    def fuzz_one(self, command: str, plan: tuple[str, list[str]], timeout: float) -> Trial:
        mode, tokens = plan
        where = self.fresh(f"fuzz-{command}")
        where.mkdir(parents=True)
        extra = [make_path(t, where, command, self.reference, self.interrupted) for t in tokens]
        if mode == "resume":
            argv = [command, *extra]
        else:
            argv = [*self.argv(command, where / "run"), *extra]
        shown = clip(
            " ".join(repr(t) if (not t or " " in t) else t for t in [command, *(extra if mode == "resume" else ["...", *extra])]), 110
        )
        run = self.pv.run(argv, cwd=where, timeout=timeout)
        if run.timed_out:
            if long_run_asked(extra):
                return Trial("fuzz", command, mode, True, f"timeout of a long run asked for: {shown}")
            return Trial("fuzz", command, mode, False, f"hung (> {timeout:.0f}s): {shown}", 3)
        if run.traceback:
            return Trial("fuzz", command, mode, False, f"traceback: {shown} -> {run.last_err()}", 3)
        if run.rc is None or run.rc < 0:
            return Trial("fuzz", command, mode, False, f"killed by signal {-(run.rc or 0)}: {shown}", 3)
        if run.rc == 0:
            return Trial("fuzz", command, mode, True, f"exit 0: {shown}")
        if run.rc not in (1, 2):
            return Trial("fuzz", command, mode, False, f"exit {run.rc}: {shown} -> {run.last_err()}", 2)
        if not run.err_lines or len(run.err_lines) > 4:
            return Trial(
                "fuzz", command, mode, False, f"exit {run.rc} with {len(run.err_lines)} stderr lines: {shown} -> {run.last_err()}", 1
            )
        return Trial("fuzz", command, mode, True, f"exit {run.rc}: {shown} -> {clip(run.last_err(), 80)}")


def make_path(token: str, where: Path, command: str, reference: dict[str, Path], interrupted: dict[str, Path]) -> str:
    """Path placeholders drawn by the strategy, made real inside the trial's own folder."""
    if not token.startswith("@"):
        return token
    kind = token[1:]
    path = where / kind
    if kind == "missing":
        return str(path)
    if kind == "file":
        path.write_text("not a run folder\n")
    elif kind == "emptydir":
        path.mkdir()
    elif kind == "badjson":
        path.mkdir()
        (path / "config.json").write_text("{not json")
    elif kind == "otherconfig":
        path.mkdir()
        other = "pbt" if command != "pbt" else "train"
        if other in reference:
            shutil.copyfile(reference[other] / "config.json", path / "config.json")
    elif kind == "finished":
        source = reference.get(command) or reference.get("train")
        if source is not None:
            shutil.copytree(source, path)
    elif kind == "interrupted":
        source = interrupted.get(command) or interrupted.get("train")
        if source is not None:
            shutil.copytree(source, path)
    elif kind == "garbage.pt":
        path.write_bytes(b"\x00garbage" * 10)
    elif kind == "space.toml":
        path.write_text("[lr\nlow = 'x'\n")
    return str(path)


# --------------------------------------------------------------------------- hypothesis strategies
CAPS = {  # a valid value past this asks for a long run (a timeout is then not a finding)
    "epochs": 6, "num_elim_steps": 200, "steps": 300, "max_t": 30, "unit_steps": 20, "k2": 200, "copies": 6,
    "num_models": 32, "max_steps": 300, "replicates": 6, "chunks": 30, "alphas": 200, "brackets": 6,
}  # fmt: skip
LONG_IF_BELOW = {"batch_size": 8, "chunk_size": 40, "check_every": 1, "grace_period": 1}
INTERESTING = [
    "0", "1", "-1", "2", "3", "nan", "NaN", "inf", "-inf", "1e308", "1e-320", "1e999", "-0", "0.5", "1.5",
    "99999999999999999999", "4294967297", "", " ", "abc", "1,2", "0,0", "1,nan", "1e-3,1e-1", "0.1,0.01",
    "-1,1", "0x10", "1_000", "\u0662", "--", "-", "x" * 300, "True", "None", "[]", "{}", "0,10,20", "5,5",
]  # fmt: skip
PATHS = ["@missing", "@file", "@emptydir", "@badjson", "@otherconfig", "@finished", "@interrupted", "@garbage.pt", "@space.toml", ""]
UNKNOWN = ["--bogus", "--num-model", "--lr-rang", "-x", "--epochs=", "--seed=1=2", "---", "--help-me"]


def long_run_asked(argv: list[str]) -> bool:
    """Whether valid flags in ``argv`` ask for a long run (many steps, big populations, --compile, a download)."""
    if "--compile" in argv or "--download" in argv:
        return True
    for i, token in enumerate(argv[:-1]):
        name = token.lstrip("-").replace("-", "_")
        values = argv[i + 1].split(",")
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            continue
        if name in CAPS and any(n > CAPS[name] for n in numbers):
            return True
        if name in LONG_IF_BELOW and any(0 < n < LONG_IF_BELOW[name] for n in numbers):
            return True
        if name == "k1" and any(n > 200 for n in numbers):
            return True
    return False


def argv_strategy(command: str, spec: list[dict[str, Any]]) -> Any:
    """(mode, extra argv): flags after the tiny defaults ("flags"), or a bare ``--resume`` of an odd folder ("resume")."""
    from hypothesis import strategies as st

    options = [s for s in spec if s["options"] and s["dest"] != "resume"]
    positional = [s for s in spec if not s["options"]]
    numbers = st.one_of(
        st.integers(-(10**22), 10**22).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f"{f},{f / 3}"),
    )
    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)
    junk = st.one_of(st.sampled_from(INTERESTING), numbers, text, st.sampled_from(PATHS))

    def value_for(s: dict[str, Any]) -> Any:
        if s["choices"]:
            return st.one_of(st.sampled_from([str(c) for c in s["choices"]]), junk)
        if s["dest"] in ("out", "data_dir", "space", "resume", "a", "b"):
            return st.one_of(st.sampled_from(PATHS), junk)
        return junk

    def pair(s: dict[str, Any]) -> Any:
        flag = st.sampled_from(s["options"])
        if s["switch"]:
            return st.tuples(flag).map(list)
        return st.one_of(
            st.tuples(flag, value_for(s)).map(list),
            st.tuples(flag, value_for(s)).map(lambda t: [f"{t[0]}={t[1]}"] if t[0].startswith("--") else list(t)),
            st.tuples(flag).map(list),  # the value missing
        )

    item = st.one_of(
        *[pair(s) for s in options],
        st.sampled_from(UNKNOWN).map(lambda u: [u]),
        st.tuples(st.sampled_from(UNKNOWN), junk).map(list),
        *([junk.map(lambda v: [v])] if positional else []),
    )
    flags_mode = st.lists(item, min_size=1, max_size=4).map(lambda items: ("flags", [t for it in items for t in it]))
    if command not in RESUMABLE:
        return flags_mode
    may_change = [s for s in options if s["dest"] in ("device", "no_progress")]
    resume_mode = st.tuples(
        st.sampled_from(["@finished", "@interrupted", "@missing", "@file", "@emptydir", "@badjson", "@otherconfig", ""]),
        st.lists(st.one_of(*[pair(s) for s in may_change + options[:3]]), max_size=2),
    ).map(lambda t: ("resume", ["--resume", t[0], *[x for it in t[1] for x in it]]))
    return st.one_of(flags_mode, resume_mode)


# --------------------------------------------------------------------------- report
def summarize(trials: list[Trial]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        rows = [t for t in trials if t.category == category]
        if not rows:
            continue
        failed = [t for t in rows if not t.passed]
        worst = max(failed, key=lambda t: t.severity) if failed else None
        table[category] = {
            "trials": len(rows),
            "passed": len(rows) - len(failed),
            "worst": f"{worst.command} {worst.name}: {worst.finding}" if worst else "none",
            "worst_severity": worst.severity if worst else 0,
        }
    return table


def print_table(table: dict[str, dict[str, Any]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text without rich
        print(title)
        for category, row in table.items():
            print(f"{category:<11} {row['trials']:>6} {row['passed']:>6}  {row['worst']}")
        return
    out = Table(title=title)
    for column, justify in (("category", "left"), ("trials", "right"), ("passed", "right"), ("worst finding", "left")):
        out.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for category, row in table.items():
        out.add_row(category, str(row["trials"]), str(row["passed"]), row["worst"])
    Console(width=160).print(out)


def markdown(table: dict[str, dict[str, Any]]) -> str:
    """The table as Markdown (for the README)."""
    lines = ["| category | trials | passed | worst finding |", "|---|---:|---:|---|"]
    for category, row in table.items():
        worst = row["worst"].replace("|", "\\|")
        lines.append(f"| {category} | {row['trials']} | {row['passed']} | {worst} |")
    return "\n".join(lines)


def git_commit(source: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials-per-category", type=int, default=2, help="random kills, and the scale of the other categories, per command"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated subset of {','.join(COMMANDS)}")
    parser.add_argument("--categories", default=",".join(CATEGORIES), help=f"comma-separated subset of {','.join(CATEGORIES)}")
    parser.add_argument("--source", type=Path, default=ROOT, help="popvec source tree to measure (default: this checkout)")
    parser.add_argument("--json", type=Path, default=None, help=f"result file (default: {DEFAULT_JSON.relative_to(ROOT)})")
    parser.add_argument("--quick", action="store_true", help="one trial per category and command, fewer fuzz examples")
    parser.add_argument("--fuzz-timeout", type=float, default=30.0, help="seconds a fuzzed run may take")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--show", type=Path, default=None, metavar="JSON", help="print the table of a result file (and as Markdown), run nothing"
    )
    args = parser.parse_args(argv)
    if args.show is not None:
        report = json.loads(args.show.read_text())
        print_table(report["table"], f"popvec reliability ({report['source_commit'][:7]}, seed {report['seed']}, {report['wall_s']:.0f}s)")
        print(markdown(report["table"]))
        return 0
    commands = [c for c in args.commands.split(",") if c]
    categories = [c for c in args.categories.split(",") if c]
    for c in commands:
        if c not in COMMANDS:
            parser.error(f"--commands: unknown command {c!r}")
    n = 1 if args.quick else args.trials_per_category
    fuzz_examples = 2 if args.quick else 3 * n
    source = args.source.resolve()
    rng = random.Random(args.seed)
    info = git_commit(source)  # the commit measured, taken before any trial
    work = Path(tempfile.mkdtemp(prefix="popvec-reliability-"))
    started = time.monotonic()
    campaign = Campaign(Popvec(source, work), rng, n, commands, say=lambda s: print(s, flush=True))
    campaign.quick = args.quick
    try:
        campaign.prepare()
        for category in CATEGORIES:
            if category not in categories:
                continue
            print(f"== {category}", flush=True)
            for command in commands:
                try:
                    if category == "kill":
                        campaign.kill_trials(command)
                    elif category == "corrupt":
                        campaign.corrupt_trials(command)
                    elif category == "concurrent":
                        campaign.concurrent_trials(command)
                    else:
                        campaign.fuzz_trials(command, fuzz_examples, args.seed * 1000 + COMMANDS.index(command), args.fuzz_timeout)
                except Exception as err:  # a fault of the campaign itself: shown, and the other commands still run
                    campaign.record(
                        Trial(category, command, "campaign-error", False, f"campaign error: {type(err).__name__}: {clip(str(err))}")
                    )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"scratch kept in {work}")
    table = summarize(campaign.trials)
    scale = "--quick" if args.quick else f"--trials-per-category {n}"
    title = f"popvec reliability ({info['commit'][:7]}{'+dirty' if info['dirty'] else ''}, seed {args.seed}, {scale})"
    print_table(table, title)
    print(markdown(table))
    report = {
        "benchmark": "reliability",
        "source_commit": info["commit"],
        "source_dirty": info["dirty"],
        "seed": args.seed,
        "trials_per_category": n,
        "quick": args.quick,
        "commands": commands,
        "conditions": "CPU, digits, mlp, tiny settings (benchmarks/reliability.py TINY), one thread per process",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "platform": platform.platform(),
        },
        "wall_s": round(time.monotonic() - started, 1),
        "table": table,
        "trials": [dataclasses.asdict(t) for t in campaign.trials],
    }
    path = args.json or DEFAULT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} ({report['wall_s']:.0f}s)")
    return 0 if all(row["passed"] == row["trials"] for row in table.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
