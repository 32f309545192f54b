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
    assert herding[0].params == {"embedding": "trained_convnet", "embed_model": "ConvNet", "embed_epochs": 2, "embed_seed": 0}


def test_cell_ids_are_stable_and_sensitive(write_suite):
    a = load_suite(write_suite()).cells()[0]
    b = load_suite(write_suite()).cells()[0]
    assert a.cell_id == b.cell_id
    c = load_suite(write_suite({"protocol": {"epochs": 3}})).cells()[0]
    assert c.cell_id != a.cell_id


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
        ({"protocol": {"model": "GPT"}}, "protocol.model: unknown model 'GPT'"),
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
