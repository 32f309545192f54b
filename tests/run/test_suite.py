import pytest

from dd_bench.errors import ConfigError
from dd_bench.run.suite import load_suite


def test_grid_and_resolved_params(write_suite):
    suite = load_suite(write_suite({"ipc": [1, 10], "seeds": [0, 1],
                                    "methods": ["random", {"name": "herding", "params": {"embed_epochs": 2}, "ipc": [1]}]}))
    cells = suite.cells()
    assert len(cells) == 2 * 2 + 1 * 2
    herding = [c for c in cells if c.method == "herding"]
    assert {c.ipc for c in herding} == {1}
    # Paper defaults are filled in: the resolved config is complete.
    assert herding[0].params == {"embedding": "trained_convnet", "embed_model": "ConvNet", "embed_epochs": 2,
                                 "embed_seed": None, "normalize": False, "kcenter_start": "mean"}


def test_cell_ids_follow_distillation_not_evaluation(write_suite):
    a = load_suite(write_suite()).cells()[0]
    b = load_suite(write_suite()).cells()[0]
    assert a.cell_id == b.cell_id
    # A protocol is an evaluation of the cell's sets, not part of what is distilled.
    c = load_suite(write_suite({"protocol": {"epochs": 3}})).cells()[0]
    assert c.cell_id == a.cell_id and c.requests[0].key != a.requests[0].key
    d = load_suite(write_suite({"budget": {"steps": 3}})).cells()[0]
    e = load_suite(write_suite({"methods": [{"name": "random", "data": {"zca": True}}]})).cells()[0]
    assert len({a.cell_id, d.cell_id, e.cell_id}) == 3


def test_a_method_version_is_part_of_the_cell_id(write_suite, monkeypatch):
    from dd_bench.methods.baselines import RandomReal

    a = load_suite(write_suite()).cells()[0]
    monkeypatch.setattr(RandomReal, "version", "2")
    b = load_suite(write_suite()).cells()[0]
    assert b.version == "2" and a.cell_id != b.cell_id


def test_a_field_added_at_its_old_behaviour_keeps_the_cell_id(write_suite, monkeypatch):
    from dd_bench.methods.baselines import Herding

    herding = {"name": "herding", "params": {"embed_epochs": 2}}
    before = load_suite(write_suite({"methods": [herding]})).cells()[0]
    # As if ``normalize`` had been added later, with False reproducing the old behaviour.
    monkeypatch.setattr(Herding, "added_fields", {"normalize": False})
    after = load_suite(write_suite({"methods": [herding]})).cells()[0]
    assert "normalize" not in after.params and after.cell_id != before.cell_id  # not the old hash...
    old = {k: v for k, v in before.params.items() if k != "normalize"}  # ...but the hash without it
    assert after.params == old
    changed = load_suite(write_suite({"methods": [{**herding, "params": {"embed_epochs": 2, "normalize": True}}]}))
    assert changed.cells()[0].params["normalize"] is True and changed.cells()[0].cell_id != after.cell_id


def test_mgdd_results_recorded_before_its_added_fields_keep_their_cell_ids(write_suite):
    entry = {"name": "mgdd", "params": {"source": "fashion_mnist", "meta_steps": 200, "meta_lr": 0.001, "adapt": False}}
    cell = load_suite(write_suite({"datasets": ["fashion_mnist"], "ipc": [10], "budget": {"steps": 200},
                                   "methods": [entry]})).cells()[0]
    assert "meta_label_per_class" not in cell.params and "generator_condition" not in cell.params
    explicit = {**entry, "params": {**entry["params"], "meta_label_per_class": 0, "generator_condition": "none"}}
    same = load_suite(write_suite({"datasets": ["fashion_mnist"], "ipc": [10], "budget": {"steps": 200},
                                   "methods": [explicit]})).cells()[0]
    assert same.cell_id == cell.cell_id
    # The id this cell had in results recorded before the fields existed (fmnist_mgdd_indomain's
    # first entry, 2026-11-22): those results are still found, not distilled again.
    recorded = load_suite(write_suite({"datasets": ["fashion_mnist"], "ipc": [10], "methods": [entry],
                                       "budget": {"steps": 200, "snapshot_every": 50}})).cells()[0]
    assert recorded.cell_id == "67e0550125f77daf"


def test_protocols_and_models_give_every_cell_its_evaluations(write_suite):
    suite = load_suite(write_suite({"protocol": None, "protocols": {"common": "dsa", "paper": {"preset": "auto", "runs": 3}},
                                    "models": ["ConvNet", "B"], "methods": ["random", "dm"]}))
    random_cell, dm_cell = suite.cells()
    groups = [r.group for r in dm_cell.requests]
    assert groups[:2] == ["common · ConvNet", "common · ConvNetBN"] and len(groups) == 2 * 6
    assert dm_cell.requests[0].primary and not any(r.primary for r in dm_cell.requests[1:])
    paper = [r for r in dm_cell.requests if r.name == "paper"][0].protocol
    assert paper.preset == "dm" and paper.runs == 3
    assert [r for r in random_cell.requests if r.name == "paper"][0].protocol.preset == "dc"


def test_per_method_data_settings_reach_the_cell(write_suite):
    cell = load_suite(write_suite({"methods": [{"name": "random", "data": {"zca": True, "zca_mode": "kornia"}}]})).cells()[0]
    assert cell.data.zca and cell.data.zca_mode == "kornia" and cell.data.identity()["zca_mode"] == "kornia"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"colour": 1}, "suite: unknown key 'colour'"),
        ({"methods": ["nope"]}, "methods[0].name: unknown method 'nope'. Available:"),
        ({"ipc": [0]}, "ipc[0]: invalid value 0 (expected an integer >= 1)"),
        ({"ipc": [-3]}, "ipc[0]: invalid value -3"),
        ({"ipc": ["ten"]}, "ipc[0]: invalid value 'ten' (expected an integer)"),
        ({"datasets": ["imagenet9000"]}, "datasets[0]: unknown dataset 'imagenet9000'"),
        ({"budget": {"steps": -1}}, "budget.steps: invalid value -1"),
        ({"budget": {"stepz": 3}}, "budget.stepz: unknown parameter"),
        ({"protocol": {"epochs": "many"}}, "protocol.epochs: invalid value 'many'"),
        ({"protocol": {"model": "GPT"}}, "protocols.main.model: unknown model 'GPT'"),
        ({"protocol": {"preset": "kip"}}, "protocol.preset: unknown preset 'kip'"),
        ({"protocols": {"a": "dc"}}, "protocols: give `protocol` (one) or `protocols` (several), not both"),
        ({"models": ["ConvNet", "GPT"]}, "models[1]: unknown model 'GPT'"),
        ({"methods": [{"name": "random", "data": {"zca": "yes"}}]}, "methods[0].data.zca: invalid value 'yes'"),
        ({"methods": [{"name": "random", "data": {"root": "/x"}}]}, "methods[0].data: unknown key 'root'"),
        ({"data": {"train_per_class": 0}}, "data.train_per_class: expected a positive integer, got 0"),
        ({"methods": [{"name": "random", "data": {"train_per_class": 5}}]},
         "methods[0].data: unknown key 'train_per_class'"),
        ({"methods": [{"name": "random", "deploy_ipc": [1]}]}, "methods[0].deploy_ipc: method 'random' cannot deploy"),
        ({"methods": [{"name": "herding", "params": {"embedding": "sift"}}]}, "methods[0].params.embedding: invalid value 'sift'"),
        ({"methods": [{"name": "herding", "params": {"lr": 1}}]}, "methods[0].params.lr: unknown parameter"),
        ({"methods": [{"name": "random", "typo": 1}]}, "methods[0]: unknown key 'typo'"),
        ({"methods": ["random", "random"]}, "methods[1].label: duplicate label 'random'"),
        ({"executor": "slurm"}, "executor: invalid value 'slurm'"),
    ],
)
def test_bad_suites_name_field_and_value(write_suite, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_suite(write_suite(overrides))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_yaml_and_missing_file(write_suite, tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML at line 3"):
        load_suite(write_suite(raw="name: x\nipc: [1, 2\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_suite(tmp_path / "absent.yaml")


def test_shipped_suites_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "suites"
    paths = sorted(root.rglob("*.yaml"))
    assert paths
    for path in paths:
        assert load_suite(path).cells()
