"""The one training loop: the official lr-drop pass counts, the cosine schedule, batch orders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_bench.eval.evaluate import recipe_for
from dd_bench.eval.protocol import EvalProtocol
from dd_bench.eval.training import TrainRecipe, train_network
from dd_bench.seeding import make_generator


def _lrs_per_step(recipe: TrainRecipe, count: int = 4) -> list[float]:
    """Train a tiny linear model and record the lr of every optimiser step (through the optimiser itself)."""
    net = nn.Linear(3, 2)
    seen: list[float] = []
    originals = {cls: cls.step for cls in (torch.optim.SGD, torch.optim.Adam)}

    def spy(original):
        def step(self, *args, **kwargs):
            seen.append(self.param_groups[0]["lr"])
            return original(self, *args, **kwargs)
        return step

    for cls, original in originals.items():
        cls.step = spy(original)
    try:
        train_network(net, torch.randn(count, 3), torch.randint(2, (count,)), recipe, loss_fn=F.cross_entropy,
                      generator=make_generator(0))
    finally:
        for cls, original in originals.items():
            cls.step = original
    return seen


@pytest.mark.parametrize("epochs, at_lr, at_tenth", [(1000, 502, 499), (300, 152, 149)])
def test_step_schedule_trains_the_official_pass_counts(epochs, at_lr, at_tenth):
    """evaluate_synset: `for ep in range(E+1): train; if ep == E//2+1: lr *= 0.1` (one batch per pass here)."""
    recipe = recipe_for(EvalProtocol(epochs=epochs, augment="none", batch_size=256), lr=0.01)
    lrs = _lrs_per_step(recipe)
    assert len(lrs) == epochs + 1
    assert sum(math.isclose(lr, 0.01) for lr in lrs) == at_lr
    assert sum(math.isclose(lr, 0.001) for lr in lrs) == at_tenth


def test_lr_drop_recreates_the_optimiser_so_momentum_restarts():
    recipe = TrainRecipe(optimizer="sgd", lr=0.1, momentum=0.9, schedule="step", drop_after_pass=0, epochs=2,
                         batch_size=4)
    created = []
    original = torch.optim.SGD.__init__

    def spy(self, params, **kwargs):
        created.append(kwargs["lr"])
        original(self, params, **kwargs)

    torch.optim.SGD.__init__ = spy
    try:
        _lrs_per_step(recipe)
    finally:
        torch.optim.SGD.__init__ = original
    assert created == [0.1, pytest.approx(0.01)]


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_final_fraction():
    recipe = TrainRecipe(optimizer="adam", lr=1.0, schedule="cosine", warmup_steps=10, final_lr_fraction=0.01,
                         steps=110, batch_size=4)
    lrs = _lrs_per_step(recipe)
    assert len(lrs) == 110
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the decay
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_cycle_order_walks_the_set_in_order_and_wraps():
    recipe = TrainRecipe(steps=4, batch_size=3, batch_order="cycle")
    images = torch.arange(5, dtype=torch.float32).view(5, 1)
    seen = []
    net = nn.Linear(1, 2)
    train_network(net, images, torch.zeros(5, dtype=torch.long), recipe, generator=make_generator(0),
                  loss_fn=lambda out, y: F.cross_entropy(out, y), augment=lambda x, g: seen.append(x.flatten().tolist()) or x)
    assert seen == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]


def test_shuffle_order_visits_every_image_once_per_pass_and_is_seeded():
    recipe = TrainRecipe(epochs=3, batch_size=2)
    images = torch.arange(5, dtype=torch.float32).view(5, 1)

    def batches(seed):
        seen = []
        train_network(nn.Linear(1, 2), images, torch.zeros(5, dtype=torch.long), recipe, loss_fn=F.cross_entropy,
                      generator=make_generator(seed), augment=lambda x, g: seen.append(x.flatten().tolist()) or x)
        return seen

    first = batches(1)
    assert len(first) == 9  # 3 passes x ceil(5 / 2)
    for p in range(3):
        assert sorted(v for b in first[3 * p : 3 * p + 3] for v in b) == [0, 1, 2, 3, 4]
    assert first == batches(1) and first != batches(2)


def test_recipe_needs_exactly_one_length():
    with pytest.raises(ValueError):
        TrainRecipe()
    with pytest.raises(ValueError):
        TrainRecipe(epochs=1, steps=1)
