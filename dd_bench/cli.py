"""``dd-bench``: run suites, list what is registered, render reports.

Errors caused by input (a broken suite, an unknown name, missing data) print one line,
``dd-bench: error: ...``, and exit 2; a suite with failed cells exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dd_bench.errors import DDBenchError
from dd_bench.run import bench

log = logging.getLogger("dd_bench")

EXIT_OK, EXIT_CELLS_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.handler(args)
    except DDBenchError as error:
        print(f"dd-bench: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dd-bench: interrupted; finished cells are saved, run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dd-bench", description="Benchmark harness for dataset distillation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a suite (skips cells already finished)")
    run.add_argument("suite", type=Path, help="suite YAML file, e.g. suites/quick.yaml")
    run.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results/)")
    run.add_argument("--cache", type=Path, default=None, help="artifact cache (default: <results>/_artifacts)")
    run.add_argument("--executor", choices=["local", "ray"], default=None, help="override the suite's executor")
    run.add_argument("--address", default=None, help="Ray cluster address to join (e.g. auto or HOST:6379)")
    run.add_argument("--device", default=None, help="override the suite's device (auto, cpu, cuda)")
    run.add_argument("--download", action="store_true", default=None, help="allow torchvision downloads")
    run.add_argument("--retry-failed", action="store_true", help="also rerun cells that failed before")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    run.set_defaults(handler=_cmd_run)

    listing = commands.add_parser("list", help="list registered methods, datasets or models")
    listing.add_argument("what", choices=["methods", "datasets", "models"])
    listing.set_defaults(handler=_cmd_list)

    report = commands.add_parser("report", help="write tables, plots and image grids for a results directory")
    report.add_argument("directory", type=Path, help="results/<suite>")
    report.add_argument("--speedup-vs", metavar="LABEL", default=None,
                        help="reference method for speedup and time-to-accuracy (default: report.speedup_vs)")
    report.add_argument("--suite", type=Path, default=None, help="suite YAML to read report.speedup_vs from")
    report.add_argument("--interpolate", action="store_true",
                        help="time-to-accuracy interpolated between snapshots (default: first snapshot reaching it)")
    report.add_argument("--data-root", type=Path, default=Path("data"), help="dataset root, to undo ZCA in grids")
    report.add_argument("--no-plots", action="store_true", help="skip plots/")
    report.add_argument("--no-grids", action="store_true", help="skip grids/")
    report.set_defaults(handler=_cmd_report)

    bench.add_parser(commands)  # dd-bench bench: speed ratios, baselines (dd_bench/run/bench.py)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from dd_bench.run.runner import RunOptions, run_suite
    from dd_bench.run.suite import load_suite

    suite = load_suite(args.suite)
    results_dir = args.results / suite.name
    options = RunOptions(results_dir=results_dir, cache_dir=args.cache or args.results / "_artifacts",
                         device=args.device or suite.device, download=args.download, progress=not args.no_progress)
    if args.dry_run:
        for cell in suite.cells():
            print(f"{cell.cell_id}  {cell.describe()}")
        return EXIT_OK
    executor = None
    if (args.executor or suite.executor) == "ray":
        from dd_bench.run.ray_executor import make_ray_executor

        executor = make_ray_executor(address=args.address or suite.ray.address)
    outcome = run_suite(suite, options, executor=executor, retry_failed=args.retry_failed)
    if not outcome.ran:
        log.info("nothing to do: all %d cells of suite '%s' are already in %s (%d finished, %d failed earlier)",
                 outcome.cells, suite.name, results_dir, outcome.skipped_finished, outcome.skipped_failed)
    else:
        log.info("suite '%s': ran %d cell(s), skipped %d already finished; %d failed", suite.name, len(outcome.ran),
                 outcome.skipped_finished, len(outcome.failed))
    _print_summary(results_dir, speedup_vs=suite.report.speedup_vs)
    return EXIT_CELLS_FAILED if outcome.failed or outcome.skipped_failed else EXIT_OK


def _print_summary(results_dir: Path, speedup_vs: str | None = None) -> None:
    """End of a run: print the tables and write the report files; a report problem never fails the run."""
    from dd_bench.report import summary, write_report

    try:
        print(summary(results_dir, speedup_vs))
        written = write_report(results_dir, speedup_vs)
        print(f"report: {len(written)} files written under {results_dir}")
    except Exception as error:  # the cells are stored already; `dd-bench report` can redo this
        log.error("report: could not write the report for %s: %s", results_dir, error,
                  exc_info=not isinstance(error, DDBenchError))


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from dd_bench.method import METHODS as registry
    elif args.what == "datasets":
        from dd_bench.data import DATASETS as registry
    else:
        from dd_bench.nets import MODELS as registry
    for name in registry.names():
        aliases = registry.aliases_of(name)
        doc = (registry.get(name).__doc__ or "").strip().splitlines()
        summary = doc[0] if doc else ""
        alias_text = f" (aliases: {', '.join(aliases)})" if aliases else ""
        print(f"{name:<18} {summary}{alias_text}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from dd_bench.errors import ConfigError
    from dd_bench.report import speedup_vs_from_suite, summary, write_report
    from dd_bench.run.store import ResultStore

    if not ResultStore(args.directory).path.exists():
        raise ConfigError(f"directory: no results.jsonl in {args.directory}")
    speedup_vs = args.speedup_vs or (speedup_vs_from_suite(args.suite) if args.suite else None)
    written = write_report(args.directory, speedup_vs, plots=not args.no_plots, grids=not args.no_grids,
                           data_root=args.data_root, interpolate=args.interpolate)
    print(summary(args.directory, speedup_vs))
    print(f"report: {len(written)} files written under {args.directory}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
