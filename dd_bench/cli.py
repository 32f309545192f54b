"""``dd-bench``: run suites, build their artifacts, list what is registered, render reports.

Errors caused by input (a broken suite, an unknown name, missing data) print one line,
``dd-bench: error: ...``, and exit 2; a suite with failed cells exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dd_bench.data import DATASETS
from dd_bench.errors import ConfigError, DDBenchError
from dd_bench.method import METHODS
from dd_bench.nets import MODELS
from dd_bench.run import bench
from dd_bench.report import speedup_vs_from_suite, summary, write_report
from dd_bench.run.runner import RunOptions, prepare_suite, run_suite
from dd_bench.run.store import ResultStore
from dd_bench.run.suite import Suite, load_suite

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

    run = commands.add_parser("run", help="run a suite (skips finished cells; evaluates them further if the suite "
                                          "gained protocols or models)")
    _suite_arguments(run)
    run.add_argument("--executor", choices=["local", "ray"], default=None, help="override the suite's executor")
    run.add_argument("--address", default=None, help="Ray cluster address to join (e.g. auto or HOST:6379)")
    run.add_argument("--retry-failed", action="store_true", help="also rerun cells that failed before")
    run.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    run.set_defaults(handler=_cmd_run)

    prepare = commands.add_parser("prepare", help="build every shared artifact a suite needs (MTT experts, MGDD's "
                                                  "meta-trained generator, ...); `run` does this first by itself")
    _suite_arguments(prepare)
    prepare.set_defaults(handler=_cmd_prepare)

    listing = commands.add_parser("list", help="list registered methods, datasets or models")
    listing.add_argument("what", choices=["methods", "datasets", "models"])
    listing.set_defaults(handler=_cmd_list)

    report = commands.add_parser("report", help="write tables, plots and image grids for a results directory")
    report.add_argument("directory", type=Path, help="results/<suite>")
    report.add_argument("--speedup-vs", metavar="LABEL", default=None,
                        help="reference method for speedup and time-to-accuracy (default: report.speedup_vs)")
    report.add_argument("--suite", type=Path, default=None, help="suite YAML to read report.speedup_vs from")
    report.add_argument("--protocol", default=None, help="only the tables of this protocol (its name in the suite)")
    report.add_argument("--model", default=None, help="only the tables of this evaluation architecture")
    report.add_argument("--interpolate", action="store_true",
                        help="time-to-accuracy interpolated before the first point that stays above the target")
    report.add_argument("--data-root", type=Path, default=Path("data"), help="dataset root, to undo ZCA in grids")
    report.add_argument("--no-plots", action="store_true", help="skip plots/")
    report.add_argument("--no-grids", action="store_true", help="skip grids/")
    report.set_defaults(handler=_cmd_report)

    bench.add_parser(commands)  # dd-bench bench: speed ratios, baselines (dd_bench/run/bench.py)
    return parser


def _suite_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("suite", type=Path, help="suite YAML file, e.g. suites/quick.yaml")
    command.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results/)")
    command.add_argument("--cache", type=Path, default=None, help="artifact cache (default: <results>/_artifacts)")
    command.add_argument("--device", default=None, help="override the suite's device (auto, cpu, cuda)")
    command.add_argument("--download", action="store_true", default=None, help="allow torchvision downloads")
    command.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args: argparse.Namespace, suite: Suite) -> RunOptions:
    return RunOptions(results_dir=args.results / suite.name, cache_dir=args.cache or args.results / "_artifacts",
                      device=args.device or suite.device, download=args.download, progress=not args.no_progress)


def _cmd_run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    options = _options(args, suite)
    if args.dry_run:
        for cell in suite.cells():
            print(f"{cell.cell_id}  {cell.describe()}  evaluations: {', '.join(r.group for r in cell.requests)}")
        return EXIT_OK
    executor = None
    if (args.executor or suite.executor) == "ray":
        # Importing Ray takes seconds; only the Ray executor needs it.
        from dd_bench.run.ray_executor import make_ray_executor

        executor = make_ray_executor(address=args.address or suite.ray.address)
    outcome = run_suite(suite, options, executor=executor, retry_failed=args.retry_failed)
    if not outcome.ran:
        log.info("nothing to do: all %d cells of suite '%s' are already in %s (%d finished, %d failed earlier)",
                 outcome.cells, suite.name, options.results_dir, outcome.skipped_finished, outcome.skipped_failed)
    else:
        log.info("suite '%s': ran %d cell(s) (%d of them only evaluated: distilled earlier), skipped %d already "
                 "finished; %d failed", suite.name, len(outcome.ran), outcome.evaluated_only,
                 outcome.skipped_finished, len(outcome.failed))
    _print_summary(options.results_dir, speedup_vs=suite.report.speedup_vs)
    return EXIT_CELLS_FAILED if outcome.failed or outcome.skipped_failed else EXIT_OK


def _cmd_prepare(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    built = prepare_suite(suite, _options(args, suite))
    if not built:
        print(f"suite '{suite.name}': no method needs a shared artifact")
    for line in built:
        print(f"{line['key']}  {line['method']} {line['dataset']}: {'cached' if line['cached'] else 'built'}, "
              f"{line['build_seconds']:.1f} s to build, in {line['directory']}")
    return EXIT_OK


def _print_summary(results_dir: Path, speedup_vs: str | None = None) -> None:
    """End of a run: print the tables and write the report files; a report problem never fails the run."""
    try:
        print(summary(results_dir, speedup_vs))
        written = write_report(results_dir, speedup_vs)
        print(f"report: {len(written)} files written under {results_dir}")
    except Exception as error:  # the cells are stored already; `dd-bench report` can redo this
        log.error("report: could not write the report for %s: %s", results_dir, error,
                  exc_info=not isinstance(error, DDBenchError))


def _cmd_list(args: argparse.Namespace) -> int:
    registry = {"methods": METHODS, "datasets": DATASETS, "models": MODELS}[args.what]
    for name in registry.names():
        aliases = registry.aliases_of(name)
        doc = (registry.get(name).__doc__ or "").strip().splitlines()
        first = doc[0] if doc else ""
        alias_text = f" (aliases: {', '.join(aliases)})" if aliases else ""
        print(f"{name:<18} {first}{alias_text}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    if not ResultStore(args.directory).path.exists():
        raise ConfigError(f"directory: no results.jsonl in {args.directory}")
    speedup_vs = args.speedup_vs or (speedup_vs_from_suite(args.suite) if args.suite else None)
    written = write_report(args.directory, speedup_vs, plots=not args.no_plots, grids=not args.no_grids,
                           data_root=args.data_root, interpolate=args.interpolate, protocol=args.protocol,
                           model=args.model)
    print(summary(args.directory, speedup_vs, protocol=args.protocol, model=args.model))
    print(f"report: {len(written)} files written under {args.directory}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
