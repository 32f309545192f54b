import torch

import dd_bench.eval.evaluate as evaluate_module
from dd_bench.eval.evaluate import evaluate
from dd_bench.eval.protocol import EvalProtocol, ProtocolSpec, resolve
from dd_bench.method import SyntheticSet

FAST = EvalProtocol(epochs=10, runs=2, batch_size=25, augment="none")


def _resolved(data, **fields) -> EvalProtocol:
    paper = ProtocolSpec("paper", "auto").protocol_for("dsa")
    return resolve(EvalProtocol(**fields), paper=paper, model="ConvNet", dataset=data, set_size=20)


def _real_set(data, per_class: int) -> SyntheticSet:
    images = torch.cat([data.class_images(c)[:per_class] for c in range(data.num_classes)])
    labels = torch.arange(data.num_classes).repeat_interleave(per_class)
    return SyntheticSet(images, labels)


def test_schedule_matches_the_reference_code():
    assert EvalProtocol(epochs=300).lr_drop_epoch() == 151
    assert EvalProtocol(epochs=1000).lr_drop_epoch() == 501
    assert EvalProtocol(epochs=1000).passes() == 1001
    text = EvalProtocol(epochs=300, runs=5, augment="none").describe()
    assert "300 epochs" in text and "×0.1 after pass 151 of 301" in text and "5 runs" in text


def test_an_unresolved_protocol_is_refused(tiny_data):
    import pytest

    with pytest.raises(ValueError, match="resolved"):
        evaluate(_real_set(tiny_data, 1), tiny_data, EvalProtocol(epochs=1, runs=1))


def test_training_on_real_images_beats_chance_and_is_seeded(tiny_data):
    syn = _real_set(tiny_data, 10)
    first = evaluate(syn, tiny_data, FAST, seed=3)
    again = evaluate(syn, tiny_data, FAST, seed=3)
    assert len(first.accuracies) == 2
    assert first.accuracies == again.accuracies
    assert first.mean > 40.0  # 10 classes: chance is 10 %


def test_one_test_pass_per_network(tiny_data, monkeypatch):
    """Never select on the test set: each trained network is tested exactly once."""
    calls = []
    original = evaluate_module.test_accuracy
    monkeypatch.setattr(evaluate_module, "test_accuracy", lambda *a, **k: calls.append(1) or original(*a, **k))
    evaluate(_real_set(tiny_data, 2), tiny_data, EvalProtocol(epochs=3, runs=3, augment="none"))
    assert len(calls) == 3


def test_one_hot_soft_labels_equal_hard_labels(tiny_data):
    hard = _real_set(tiny_data, 3)
    soft = SyntheticSet(hard.images, torch.nn.functional.one_hot(hard.labels, 10).float())
    protocol = EvalProtocol(epochs=5, runs=1, augment="none")
    a = evaluate(hard, tiny_data, protocol, seed=1)
    b = evaluate(soft, tiny_data, protocol, seed=1)
    assert abs(a.accuracies[0] - b.accuracies[0]) < 1e-6
    assert b.label_type.startswith("soft")


def test_learned_lr_is_used_when_present(tiny_data):
    syn = _real_set(tiny_data, 1)
    syn.learned_lr = 0.003
    assert evaluate(syn, tiny_data, EvalProtocol(epochs=1, runs=1, augment="none")).lr == 0.003
    fixed = EvalProtocol(epochs=1, runs=1, augment="none", use_learned_lr=False)
    assert evaluate(syn, tiny_data, fixed).lr == 0.01


def test_dsa_augmented_training_runs(tiny_data):
    protocol = _resolved(tiny_data, epochs=2, runs=1)
    result = evaluate(_real_set(tiny_data, 2), tiny_data, protocol)
    assert 0.0 <= result.accuracies[0] <= 100.0
    assert result.protocol["augment"] == "dsa" and result.protocol["dsa_strategy"] == tiny_data.dsa_strategy


def test_dc_augmented_training_runs_and_changes_the_result(tiny_data):
    plain = evaluate(_real_set(tiny_data, 2), tiny_data, _resolved(tiny_data, epochs=3, runs=1, augment="none"), seed=1)
    augmented = _resolved(tiny_data, epochs=3, runs=1, augment="dc", dc_strategy="crop_scale_rotate")
    result = evaluate(_real_set(tiny_data, 2), tiny_data, augmented, seed=1)
    assert result.protocol["augment"] == "dc" and result.protocol["dc_strategy"] == "crop_scale_rotate"
    assert result.accuracies != plain.accuracies


def test_mse_protocol_regresses_centred_one_hot_targets_for_hard_labels(tiny_data):
    syn = _real_set(tiny_data, 1)
    targets, _, label_type = evaluate_module.training_targets(syn, 10, EvalProtocol(hard_label_loss="mse"))
    assert targets.shape == (10, 10) and "MSE" in label_type
    assert torch.allclose(targets.sum(dim=1), torch.zeros(10), atol=1e-6) and targets.max() == 0.9
