"""Does an adapted MGDD generator improve initialisations outside its pool? (issue 11)

Adapts one generator with the settings of fmnist_mgdd.yaml's cell (Fashion-MNIST IPC 10, 200
steps; by default the untrained generator, ``meta_train: false``), then scores four sets with
the suites' common protocol (``dsa`` preset at 300 epochs, soft cross-entropy). The global RNG
is seeded with 0 directly, where the harness seeds a cell's distillation with a seed derived
from the cell's: the same settings, another random draw of the initialisations. The sets:

- ``pool0 identity``: the pool's first initialisation with its analytical labels;
- ``pool0 generated``: the generator's output on it (the harness's ``result``);
- ``fresh identity``: a fresh initialisation, as ``deploy`` draws one, with its labels;
- ``fresh generated``: the generator's output on it (``deploy`` at the adaptation IPC).

``--deploy-ipc 1 50`` also scores, at each of those IPCs, ``deploy``'s fresh initialisation with
its labels (``ipc K identity``) against ``deploy``'s set (``ipc K generated``): what the generator
adds at IPCs it was not adapted at; ``--only-deploy`` skips the four sets above.

usage: python tools/mgdd_generalisation.py [--param pool_size=64 ...] [--runs 2] [--steps 200]
       [--deploy-ipc 1 50 [--only-deploy]]
Takes about 10 minutes on 2 CPU cores (one heavy job at a time), more with IPC 50.
"""

from __future__ import annotations

import argparse
import logging
import time

import yaml

from dd_bench.data import load_dataset
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import AUTO, ProtocolSpec, preset, resolve
from dd_bench.method import RunContext, SyntheticSet, create_method
from dd_bench.seeding import derive_seed, seed_everything

log = logging.getLogger("mgdd_generalisation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--param", action="append", default=[], help="an MGDD config field, KEY=VALUE (VALUE as in a suite's YAML)")
    parser.add_argument("--runs", type=int, default=2, help="networks per set")
    parser.add_argument("--steps", type=int, default=200, help="adaptation steps")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--deploy-ipc", type=int, nargs="*", default=[], help="IPCs to deploy at as well")
    parser.add_argument("--only-deploy", action="store_true", help="score only the --deploy-ipc sets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = {"meta_train": False, **{k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}}
    data = load_dataset(args.dataset)
    method = create_method("mgdd", params)
    seed_everything(0)
    ctx = RunContext(seed=0)
    started = time.perf_counter()
    state = method.init(data, args.ipc, ctx)
    pool0 = SyntheticSet(state.pool_images[0].clone(), state.pool_labels[0].clone())
    for _ in range(args.steps):
        method.step(state, ctx)
    log.info("params %s: adapted %d steps in %.0f s", params, args.steps, time.perf_counter() - started)
    sets = {}
    if not args.only_deploy:
        sets.update({"pool0 identity": pool0, "pool0 generated": method.result(state),
                     "fresh identity": method.deploy_initialisation(state, args.ipc),
                     "fresh generated": method.deploy(state, args.ipc, ctx)})
    for ipc in args.deploy_ipc:
        sets.update({f"ipc {ipc} identity": method.deploy_initialisation(state, ipc),
                     f"ipc {ipc} generated": method.deploy(state, ipc, ctx)})
    paper = ProtocolSpec("paper", AUTO).protocol_for(type(method).paper_protocol)
    for name, syn in sets.items():
        protocol = resolve(preset("dsa", epochs=300, runs=args.runs, soft_label_loss="soft_ce"), paper=paper,
                           model="ConvNet", dataset=data, set_size=len(syn))
        result = evaluate(syn, data, protocol, seed=derive_seed(0, "final"))
        log.info("%-16s %.2f  %s", name, result.mean, [round(a, 2) for a in result.accuracies])


if __name__ == "__main__":
    main()
