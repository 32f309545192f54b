"""Selection baselines: herding and k-center picks, their options, embeddings that follow the cell's seed."""

from __future__ import annotations

import torch

from dd_bench.method import RunContext, create_method
from dd_bench.methods.baselines import FullDataset, RandomReal, herding_order, kcenter_greedy


def test_herding_keeps_the_running_mean_closest_to_the_class_mean():
    features = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    # mean (2.5, 0): first the point nearest it (1, 0); then the one that brings the mean of two closest: (10+1)/2=5.5
    # vs (0+1)/2=0.5 vs (-1+1)/2=0 -> |5.5-2.5|=3 beats |0.5-2.5|=2? no: 2 < 3, so (0, 0).
    assert herding_order(features, 2).tolist() == [2, 0]


def test_kcenter_adds_the_farthest_point_and_can_start_anywhere():
    features = torch.tensor([[0.0], [1.0], [5.0], [9.0], [10.0]], dtype=torch.float64)
    assert kcenter_greedy(features, 3).tolist() == [2, 0, 4]  # nearest the mean 5: 5; farthest: 0 (ties 10: first max), then 10
    assert kcenter_greedy(features, 2, first=0).tolist() == [0, 4]


def _select(data, seed: int, **params) -> torch.Tensor:
    method = create_method("kcenter", params)
    return method.init(data, 2, RunContext(seed=seed)).images


def test_the_embedding_follows_the_cells_seed_unless_fixed(data):
    small = data.subset(per_class=15, test_per_class=5)
    params = {"embed_epochs": 1, "embed_model": "ConvNetW32"}
    assert torch.equal(_select(small, 0, **params), _select(small, 0, **params))
    assert not torch.equal(_select(small, 0, **params), _select(small, 1, **params))
    assert create_method("kcenter", params).artifact_spec(small) is None  # trained per cell, in init
    fixed = create_method("kcenter", {**params, "embed_seed": 3})
    assert fixed.artifact_spec(small)["seed"] == 3  # one shared net: an artifact


def test_random_start_and_normalised_features_change_the_pick(data):
    small = data.subset(per_class=15, test_per_class=5)
    plain = _select(small, 0, embedding="pixels")
    assert torch.equal(plain, _select(small, 1, embedding="pixels"))  # nearest-the-mean start: no randomness
    starts = [_select(small, seed, embedding="pixels", kcenter_start="random") for seed in (0, 1)]
    assert not torch.equal(starts[0], starts[1])
    method = create_method("herding", {"embedding": "pixels", "normalize": True})
    features = method._features(None, small.class_images(0), RunContext())
    assert torch.allclose(features.norm(dim=1), torch.ones(len(features), dtype=features.dtype))


def test_traits_mark_the_references():
    assert RandomReal.traits()["reference"] == "lower" and not RandomReal.traits()["iterative"]
    assert FullDataset.traits()["reference"] == "upper" and FullDataset.traits()["ipc_free"]
    assert create_method("herding").traits()["reference"] is None
