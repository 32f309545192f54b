"""Does an adapted MGDD generator improve initialisations outside its pool? (issue 11)

Adapts one generator (fmnist_mgdd.yaml's cell: Fashion-MNIST IPC 10, seed 0, 200 steps; by
default the untrained generator, ``meta_train: false``), then scores four sets with the suites'
common protocol (``dsa`` preset at 300 epochs, soft cross-entropy):

- ``pool0 identity``: the pool's first initialisation with its analytical labels;
- ``pool0 generated``: the generator's output on it (the harness's ``result``);
- ``fresh identity``: a fresh initialisation, as ``deploy`` draws one, with its labels;
- ``fresh generated``: the generator's output on it (``deploy`` at the adaptation IPC).

usage: python tools/mgdd_generalisation.py [--param pool_size=64 ...] [--runs 2] [--steps 200]
Takes about 10 minutes on 2 CPU cores (one heavy job at a time).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

from dd_bench.data import load_dataset
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import AUTO, ProtocolSpec, preset, resolve
from dd_bench.method import RunContext, SyntheticSet, create_method
from dd_bench.seeding import derive_seed, make_generator, seed_everything

log = logging.getLogger("mgdd_generalisation")


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--param", action="append", default=[], help="an MGDD config field, KEY=VALUE")
    parser.add_argument("--runs", type=int, default=2, help="networks per set")
    parser.add_argument("--steps", type=int, default=200, help="adaptation steps")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--ipc", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = {"meta_train": False, **{k: _value(v) for k, v in (p.split("=", 1) for p in args.param)}}
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
    # The initialisation deploy() draws at this IPC, with its labels, without the generator.
    stream = make_generator(derive_seed(state.seed, "deploy", args.ipc))
    initial = method._initialisation(data, args.ipc, stream, state.device)
    labels = method._labels(data, state.label_net, state.weights, initial)
    deployed = method.deploy(state, args.ipc, ctx)
    assert torch.equal(deployed.labels, labels)
    sets = {"pool0 identity": pool0, "pool0 generated": method.result(state),
            "fresh identity": SyntheticSet(initial, labels), "fresh generated": deployed}
    paper = ProtocolSpec("paper", AUTO).protocol_for(type(method).paper_protocol)
    protocol = resolve(preset("dsa", epochs=300, runs=args.runs, soft_label_loss="soft_ce"), paper=paper,
                       model="ConvNet", dataset=data, set_size=args.ipc * data.num_classes)
    for name, syn in sets.items():
        result = evaluate(syn, data, protocol, seed=derive_seed(0, "final"))
        log.info("%-16s %.2f  %s", name, result.mean, [round(a, 2) for a in result.accuracies])


if __name__ == "__main__":
    main()
