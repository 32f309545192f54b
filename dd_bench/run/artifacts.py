"""Shared one-off preparation: build a method's artifact once, reuse it in every cell.

The key is a hash of the method's ``artifact_spec`` alone (which includes what it depends on,
such as the dataset's fingerprint), so two methods that need the same artifact (herding and
k-center need the same embedding network) share one build. Building happens under a file lock, so concurrent cells (Ray
workers, several processes) wait for the first builder instead of repeating its work; a
``.complete`` marker is written last, so an interrupted build is redone, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from dd_bench.run.measure import Stopwatch
from dd_bench.method import Method, RunContext

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"


@dataclass
class PreparedArtifact:
    directory: Path | None
    build_seconds: float
    cached: bool


def artifact_key(spec: dict) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_method(method: Method, data, cache_dir: Path, ctx: RunContext) -> PreparedArtifact:
    """Build (if needed) and load the method's artifact; time only the build."""
    spec = method.artifact_spec(data)
    if spec is None:
        return PreparedArtifact(None, 0.0, False)
    name = method.registry_name or type(method).__name__
    directory = Path(cache_dir) / artifact_key(spec)
    directory.parent.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch(ctx.device)
    cached = True
    with FileLock(str(directory) + ".lock"):
        if not (directory / COMPLETE_MARKER).exists():
            cached = False
            if directory.exists():  # a build that was interrupted: start again from nothing
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            (directory / "spec.json").write_text(json.dumps(spec, sort_keys=True, indent=1, default=str))
            log.info("%s: building artifact %s", name, directory)
            with watch:
                method.build_artifacts(data, directory, ctx)
            (directory / COMPLETE_MARKER).touch()
    method.load_artifacts(directory, ctx)
    return PreparedArtifact(directory, watch.seconds, cached)
