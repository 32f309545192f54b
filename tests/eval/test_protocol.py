"""Protocols: presets, `auto` resolved per method and set, strategies followed or forced, suite specs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dd_bench.errors import ConfigError
from dd_bench.eval.protocol import PRESETS, EvalProtocol, ProtocolSpec, frepo_steps, preset, resolve

FMNIST = SimpleNamespace(dsa_strategy="color_crop_cutout_flip_scale_rotate", dc_strategy="none", channels=1,
                         name="fashion_mnist")
MNIST = SimpleNamespace(dsa_strategy="color_crop_cutout_scale_rotate", dc_strategy="crop_scale_rotate", channels=1,
                        name="mnist")
CIFAR = SimpleNamespace(dsa_strategy="color_crop_cutout_flip_scale_rotate", dc_strategy="none", channels=3,
                        name="cifar10")


def _paper(name: str) -> EvalProtocol:
    return ProtocolSpec("paper", "auto").protocol_for(name)


def _auto(method_paper: str, data=FMNIST, model: str | None = None, set_size: int = 100,
          spec: ProtocolSpec | None = None, method_dsa: str | None = None) -> EvalProtocol:
    spec = spec or ProtocolSpec("paper", "auto")
    base = spec.protocol_for(method_paper)
    return resolve(base, paper=_paper(method_paper), model=model or base.model, dataset=data, set_size=set_size,
                   method_dsa_strategy=method_dsa)


def test_epochs_auto_is_each_papers_length():
    assert _auto("dc").epochs == 300 and _auto("dc").augment == "none"          # DC on Fashion-MNIST: no aug
    dc_mnist = _auto("dc", data=MNIST)
    assert (dc_mnist.epochs, dc_mnist.augment, dc_mnist.dc_strategy) == (1000, "dc", "crop_scale_rotate")
    for name in ("dsa", "dm", "mtt"):
        assert _auto(name).epochs == 1000 and _auto(name).augment == "dsa"
    frepo = _auto("frepo", set_size=100)
    assert frepo.steps == 2000 and frepo.epochs is None and frepo.model == "FRePoConvNet"


def test_dc_evaluates_convnetbn_with_crop_noise_and_1000_epochs():
    protocol = _auto("dc", model="ConvNetBN")
    assert (protocol.augment, protocol.dc_strategy, protocol.epochs) == ("dc", "crop_noise", 1000)


def test_frepo_steps_follow_the_set_size_table():
    assert [frepo_steps(n) for n in (10, 100, 200, 400, 500, 1000, 2000, 5000)] == \
        [1000, 2000, 20000, 5000, 5000, 10000, 40000, 40000]
    assert frepo_steps(150) == 2000 and frepo_steps(5) == 1000  # nearest tabulated size below (or the smallest)


def test_frepo_flips_colour_images_only():
    assert "flip" not in _auto("frepo").frepo_strategy
    assert _auto("frepo", data=CIFAR).frepo_strategy.startswith("flip_")


def test_dsa_evaluation_follows_the_methods_strategy_unless_forced():
    own = _auto("dsa", method_dsa="crop")
    assert own.dsa_strategy == "crop" and not own.notes
    forced = _auto("dsa", method_dsa="crop", spec=ProtocolSpec.parse("x", {"preset": "dsa", "dsa_strategy": "flip"}, "p"))
    assert forced.dsa_strategy == "flip"
    assert forced.notes and "forced" in forced.notes[0] and "crop" in forced.notes[0]


def test_a_named_preset_keeps_its_own_length_rule_whatever_the_method():
    common = ProtocolSpec.parse("common", "dc", "p")
    assert _auto("dm", spec=common).epochs == 300          # the dc preset: 300 without augmentation
    assert _auto("frepo", spec=common).optimizer == "sgd"


def test_a_step_schedule_protocol_gives_a_steps_paper_1000_epochs_and_says_so():
    custom = ProtocolSpec.parse("common", {"augment": "dsa"}, "p")
    protocol = _auto("frepo", spec=custom)
    assert protocol.epochs == 1000 and protocol.steps is None
    assert any("counts steps" in n for n in protocol.notes)


def test_presets_carry_the_papers_facts():
    assert preset("mtt").use_learned_lr and preset("mtt").dsa_align_corners and preset("mtt").test_batch_size == 128
    assert preset("frepo").optimizer == "adam" and preset("frepo").warmup_steps == 500
    assert preset("dc").runs == 20 and set(PRESETS) == {"dc", "dsa", "dm", "mtt", "frepo"}


def test_spec_overrides_and_errors():
    spec = ProtocolSpec.parse("paper", {"preset": "auto", "runs": 10}, "protocols.paper")
    assert spec.protocol_for("dsa").runs == 10 and spec.protocol_for("dsa").epochs == 1000
    with pytest.raises(ConfigError, match="protocols.x.preset: unknown preset 'nope'"):
        ProtocolSpec.parse("x", {"preset": "nope"}, "protocols.x")
    with pytest.raises(ConfigError, match=r"protocols.x.runs: invalid value 'many'"):
        ProtocolSpec.parse("x", {"runs": "many"}, "protocols.x")
    with pytest.raises(ConfigError, match="protocols.x.bogus: unknown parameter"):
        ProtocolSpec.parse("x", {"bogus": 1}, "protocols.x")


def test_describe_says_everything():
    text = _auto("dc").describe()
    for part in ("ConvNet", "SGD lr 0.01", "300 epochs", "×0.1 after pass 151 of 301", "batch 256", "aug none",
                 "20 runs", "fp32"):
        assert part in text
    assert "Adam lr 0.0003" in _auto("frepo").describe() and "2000 steps" in _auto("frepo").describe()
