"""Shared one-off preparation: build a method's artifact once, reuse it in every cell.

An artifact (MTT's expert trajectories, MGDD's meta-trained generator, herding's embedding
net) is keyed by a hash of the method's ``artifact_spec`` alone, so two cells or methods that
need the same artifact share one build, whichever starts it. Rules:

- **Seeded from the spec.** Before ``build_artifacts`` the harness seeds torch, NumPy and
  Python from ``derive_seed("artifact", key)`` and hands the method a ``RunContext`` with that
  seed: an artifact's content is a function of its key, never of the cell that built it.
- **Resumable.** An interrupted build (Ctrl-C, a crash, SIGKILL) leaves its folder in place;
  the next build calls ``build_artifacts`` again on it, and a method that saved checkpoints
  there (``dd_bench.checkpoint``) resumes from them. ``.complete`` is written last, so an
  unfinished folder is never loaded.
- **Accounted.** ``build.json`` records every attempt (seconds, device, versions, commit, and
  the error of a failed one); every record that uses the artifact carries its key and the
  seconds all attempts took, so a cached artifact is never reported as free.
- **Built first.** ``prepare_suite`` builds every artifact a suite needs before any cell runs
  (``dd-bench prepare``; ``dd-bench run`` calls it), so cells never wait on an artifact lock
  while holding a GPU share.
- Builds take a file lock, so concurrent processes wait for the first builder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from dd_bench.method import Method, RunContext
from dd_bench.run.measure import Stopwatch, describe_device, environment
from dd_bench.seeding import derive_seed, seed_everything

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
BUILD_FILE = "build.json"


@dataclass
class PreparedArtifact:
    """The artifact a cell uses: where it is, its key, and what building it cost."""

    directory: Path | None
    key: str | None
    build_seconds: float
    cached: bool

    def describe(self) -> dict[str, Any] | None:
        if self.key is None:
            return None
        return {"key": self.key, "build_seconds": self.build_seconds, "cached": self.cached,
                "directory": str(self.directory)}


def artifact_key(spec: dict) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_build_info(directory: Path) -> dict[str, Any]:
    path = Path(directory) / BUILD_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_build_info(directory: Path, info: dict[str, Any]) -> None:
    tmp = directory / f".{BUILD_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, directory / BUILD_FILE)


def build_seconds(info: dict[str, Any]) -> float:
    """Seconds all build attempts of an artifact took (an interrupted attempt counts what it logged)."""
    return float(sum(a.get("seconds") or 0.0 for a in info.get("attempts", [])))


def _account_killed_attempts(info: dict[str, Any], directory: Path) -> None:
    """An attempt still marked "building" was killed (SIGKILL, power): count its time up to the
    last file it wrote (its last checkpoint), so a resumed artifact's build time stays honest."""
    for attempt in info.get("attempts", []):
        if attempt.get("status") != "building":
            continue
        started = datetime.fromisoformat(attempt["started_at"]).timestamp()
        written = [p.stat().st_mtime for p in directory.iterdir() if p.name != BUILD_FILE]
        attempt.update(status="killed", seconds=max(0.0, max(written, default=started) - started),
                       note="killed mid-build; seconds counted up to its last checkpoint")


def prepare_method(method: Method, data: Any, cache_dir: Path, ctx: RunContext,
                   load_dataset: Callable[[str], Any] | None = None) -> PreparedArtifact:
    """Build the method's artifact if it is not complete, then load it; time only the build.

    ``ctx`` is the caller's context (device, progress); the build gets its own, seeded from
    the artifact's key. ``load_dataset`` is handed to the build (MGDD's source dataset).
    """
    spec = method.artifact_spec(data)
    if spec is None:
        return PreparedArtifact(None, None, 0.0, False)
    key = artifact_key(spec)
    directory = Path(cache_dir) / key
    directory.parent.mkdir(parents=True, exist_ok=True)
    cached = True
    with FileLock(str(directory) + ".lock"):
        if not (directory / COMPLETE_MARKER).exists():
            cached = False
            _build(method, data, spec, key, directory, ctx, load_dataset)
    info = read_build_info(directory)
    load_ctx = RunContext(device=ctx.device, seed=derive_seed("artifact", key), artifact_dir=directory,
                          progress=ctx.progress, load_dataset=load_dataset or ctx.load_dataset)
    method.load_artifacts(directory, load_ctx)
    return PreparedArtifact(directory, key, build_seconds(info), cached)


def _build(method: Method, data: Any, spec: dict, key: str, directory: Path, ctx: RunContext,
           load_dataset: Callable[[str], Any] | None) -> None:
    name = method.registry_name or type(method).__name__
    resuming = directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    info = read_build_info(directory) or {"key": key, "method": name, "spec": spec, "attempts": []}
    # Before anything is written here: a killed attempt's time ends at the newest file it left.
    _account_killed_attempts(info, directory)
    (directory / "spec.json").write_text(json.dumps(spec, sort_keys=True, indent=1, default=str))
    attempt = {"started_at": _now(), "device": describe_device(ctx.device), "status": "building", "seconds": 0.0,
               "resumed": resuming, "versions": environment()["versions"],
               "git_commit": environment()["git_commit"]}
    info["attempts"].append(attempt)
    info["status"] = "building"
    _write_build_info(directory, info)
    log.info("%s: %s artifact %s", name, "resuming the build of" if resuming else "building", directory)
    seed = derive_seed("artifact", key)
    seed_everything(seed)  # the build's randomness is a function of its key alone
    build_ctx = RunContext(device=ctx.device, seed=seed, artifact_dir=directory, progress=ctx.progress,
                           load_dataset=load_dataset or ctx.load_dataset)
    watch = Stopwatch(ctx.device)
    try:
        with watch:
            method.build_artifacts(data, directory, build_ctx)
    except BaseException as error:
        attempt.update(seconds=watch.seconds, finished_at=_now(),
                       status="interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                       error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        info["status"] = attempt["status"]
        _write_build_info(directory, info)
        raise
    attempt.update(seconds=watch.seconds, finished_at=_now(), status="complete")
    info["status"] = "complete"
    info["build_seconds"] = build_seconds(info)
    _write_build_info(directory, info)
    (directory / COMPLETE_MARKER).touch()
    log.info("%s: artifact %s built in %.1f s", name, key, watch.seconds)
