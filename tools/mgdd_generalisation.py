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

``--loss-every N`` also logs, every N adaptation steps, Eq. 1 in fixed held-out terms (the mean over
4 random nets drawn once, against one real batch of 100 images per class drawn once; both
apart from the cell's stream) on the pool's first initialisation and on 8 fresh initialisations
(mean), each as it starts and as the generator makes it: whether what adaptation learns
lowers the loss of sets it never saw, without training a network (``--no-accuracy`` skips the
scoring below).

``--deploy-ipc 1 50`` also scores, at each of those IPCs, ``deploy``'s fresh initialisation with
its labels (``ipc K identity``) against ``deploy``'s set (``ipc K generated``): what the generator
adds at IPCs it was not adapted at; ``--only-deploy`` skips the four sets above.

``--param meta_train=true --artifacts DIR`` starts from a meta-trained generator instead: built
in DIR, or found there when a suite run with the same meta settings built it (a results
directory's ``_artifacts``; a build of 2,000 meta steps took 61 minutes on 2 cores); the loss
probe's step-0 line is then what meta-training alone transfers to the target.

usage: python tools/mgdd_generalisation.py [--param pool_size=64 ...] [--runs 2] [--steps 200]
       [--deploy-ipc 1 50 [--only-deploy]] [--loss-every 100 [--no-accuracy]] [--artifacts DIR]
Takes about 10 minutes on 2 CPU cores (one heavy job at a time), more with IPC 50.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import yaml

from dd_bench.data import load_dataset
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import AUTO, ProtocolSpec, preset, resolve
from dd_bench.method import RunContext, SyntheticSet, create_method
from dd_bench.methods.mgdd_parts import embed_in_chunks, krr_loss_given_real, one_hot, random_feature_net
from dd_bench.run.artifacts import prepare_method
from dd_bench.seeding import derive_seed, make_generator, seed_everything

log = logging.getLogger("mgdd_generalisation")

#: The loss probe's own stream (its real batch, then its fresh sets) and its nets' seeds.
PROBE_SEED = 12345
PROBE_NET_SEEDS = tuple(999 + i for i in range(4))
PROBE_SETS = 8
PROBE_REAL_PER_CLASS = 100


class LossProbe:
    """Eq. 1 in fixed held-out terms, so values at different steps compare: fixed nets, one
    fixed real batch (embedded once per net), fixed fresh initialisations."""

    def __init__(self, method, state, data, ipc: int):
        cfg, k = method.config, data.num_classes
        stream = make_generator(PROBE_SEED)
        real = torch.cat([data.sample_real(c, PROBE_REAL_PER_CLASS, generator=stream) for c in range(k)])
        self.targets = one_hot(torch.arange(k).repeat_interleave(PROBE_REAL_PER_CLASS), k).to(state.device)
        self.fresh = [method.initialisation(state, ipc, stream) for _ in range(PROBE_SETS)]
        self.nets = [random_feature_net(cfg.feature_model, data.channels, data.image_size, seed, state.device)
                     for seed in PROBE_NET_SEEDS]
        self.real_features = [embed_in_chunks(net, real.to(state.device)) for net in self.nets]
        self.reg = cfg.loss_reg

    @torch.no_grad()
    def loss(self, syn: SyntheticSet) -> float:
        return sum(float(krr_loss_given_real(net, real, self.targets, syn.images, syn.labels, self.reg))
                   for net, real in zip(self.nets, self.real_features)) / len(self.nets)

    def report(self, method, state, pool0: SyntheticSet, step: int, seconds: float) -> None:
        start, made = self.loss(pool0), self.loss(method.produce(state, pool0))
        fresh_start = sum(self.loss(s) for s in self.fresh) / len(self.fresh)
        fresh_made = sum(self.loss(method.produce(state, s)) for s in self.fresh) / len(self.fresh)
        log.info("step %5d  Eq. 1 pool0 %.4f -> %.4f (%+.1f%%)  fresh %d %.4f -> %.4f (%+.1f%%)  %.0f s", step, start,
                 made, 100 * (made / start - 1), len(self.fresh), fresh_start, fresh_made,
                 100 * (fresh_made / fresh_start - 1), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--param", action="append", default=[], help="an MGDD config field, KEY=VALUE (VALUE as in a suite's YAML)")
    parser.add_argument("--runs", type=int, default=2, help="networks per set")
    parser.add_argument("--steps", type=int, default=200, help="adaptation steps")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--deploy-ipc", type=int, nargs="*", default=[], help="IPCs to deploy at as well")
    parser.add_argument("--only-deploy", action="store_true", help="score only the --deploy-ipc sets")
    parser.add_argument("--loss-every", type=int, default=0,
                        help="log Eq. 1 on the pool's first set and on fresh sets every N steps (0: never)")
    parser.add_argument("--no-accuracy", action="store_true", help="score no set (with --loss-every: the loss only)")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="where the meta-trained generator is built or found (with --param meta_train=true)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = {"meta_train": False, **{k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}}
    data = load_dataset(args.dataset)
    method = create_method("mgdd", params)
    if args.artifacts is not None:
        prepared = prepare_method(method, data, args.artifacts, RunContext(seed=0), load_dataset)
        if prepared.key is not None:
            log.info("meta-trained generator %s (%s, built in %.0f s)", prepared.key,
                     "found" if prepared.cached else "built", prepared.build_seconds)
    seed_everything(0)
    ctx = RunContext(seed=0)
    started = time.perf_counter()
    state = method.init(data, args.ipc, ctx)
    pool0 = SyntheticSet(state.pool_images[0].clone(), state.pool_labels[0].clone())
    probe = LossProbe(method, state, data, args.ipc) if args.loss_every > 0 else None
    if probe:
        probe.report(method, state, pool0, 0, 0.0)
    for step in range(1, args.steps + 1):
        method.step(state, ctx)
        if probe and step % args.loss_every == 0:
            probe.report(method, state, pool0, step, time.perf_counter() - started)
    log.info("params %s: adapted %d steps in %.0f s", params, args.steps, time.perf_counter() - started)
    if args.no_accuracy:
        return
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
