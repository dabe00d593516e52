"""params.yaml: one validated config; unknown keys and wrong types are named errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.params import ParamsError, PipelineParams, load_params, parse_params

PROJECT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_project_params_load_and_hash_is_stable():
    cfg = load_params(PROJECT_PARAMS)
    assert cfg.unlearn.method == "l2ul"
    assert cfg.sha256() == load_params(PROJECT_PARAMS).sha256()
    flat = cfg.flat()
    assert flat["gates.max_test_drop"] == cfg.gates.max_test_drop
    assert all(not isinstance(v, dict) for v in flat.values())  # scalars only (DVC)


def test_defaults_fill_missing_sections():
    assert parse_params({}) == PipelineParams()


@pytest.mark.parametrize("data, message", [
    ({"gates": {"max_test_dorp": 1.0}}, "unknown key 'gates.max_test_dorp'"),
    ({"trainig": {}}, "unknown key 'trainig'"),
    ({"pretrain": {"epochs": "ten"}}, "pretrain.epochs: input should be a valid integer"),
    ({"pretrain": {"epochs": 0}}, "pretrain.epochs"),
    ({"gates": {"require_finite_weights": "yes"}}, "gates.require_finite_weights"),
    ({"unlearn": {"method": "nope"}}, "unknown method 'nope'"),
    ({"dataset": {"name": "mnist"}}, "dataset.name: unknown dataset 'mnist'"),
    ({"pretrain": {"arch": "vgg"}}, "pretrain.arch: unknown model 'vgg'"),
    ({"unlearn": {"params": {"lr": "fast"}}}, "l2ul.lr must be float, got 'fast'"),
    ({"unlearn": {"fallback": [{"method": "l2ul", "params": {"lr": "fast"}}]}},
     "fallback[0].params: l2ul.lr must be float, got 'fast'"),
    ({"unlearn": {"params": {"learning_rate": 0.1}}}, "unknown parameter(s) for l2ul"),
    ({"unlearn": {"consolidate_drop": float("nan")}},
     "unlearn.consolidate_drop: input should be a finite number (got nan)"),
    ({"unlearn": {"consolidate_every": -1}}, "unlearn.consolidate_every"),
    ({"unlearn": {"retain_fraction": 0.02}},
     "unlearn.retain_fraction: input should be less than or equal to 0.01 (got 0.02)"),
    ({"unlearn": {"retain_fraction": float("inf")}}, "unlearn.retain_fraction"),
    ({"unlearn": {"retain_fraction": -0.01}}, "unlearn.retain_fraction"),
    ({"unlearn": {"method": "neggrad", "retain_fraction": 0.01}},
     "unlearn: method: neggrad takes no retain sample, and unlearn.retain_fraction is 0.01"),
    ({"unlearn": {"method": "scrub"}},
     "unlearn: method: scrub needs a retain sample: set unlearn.retain_fraction"),
    ({"unlearn": {"retain_fraction": 0.01, "fallback": [{"method": "neggrad"}]}},
     "unlearn: fallback[0].method: neggrad takes no retain sample"),
    ({"unlearn": {"fallback": [{"method": "ssd"}]}},
     "unlearn: fallback[0].method: ssd needs a retain sample"),
    ({"registry": {"model_name": "it's"}},
     "registry.model_name: \"it's\" holds the character(s) \"'\"; use letters, digits"),
    ({"registry": {"model_name": "team/model"}}, "holds the character(s) '/'"),
    ({"registry": {"model_name": "a\\b"}}, "holds the character(s) '\\\\'"),
    ({"registry": {"model_name": " padded"}}, "holds leading or trailing spaces"),
    ({"registry": {"experiment": "x\ny"}},
     "registry.experiment: 'x\\ny' holds the character(s) '\\n'"),
    ([1, 2], "expected a mapping"),
])
def test_invalid_params_are_named(data, message):
    with pytest.raises(ParamsError) as err:
        parse_params(data, source="params.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_workspace_style_experiment_name_is_used_as_given(tmp_path):
    # experiments are looked up by name, never through a filter: '/', ':' and quotes work
    import mlflow

    from tasks import registry
    from tasks.paths import Paths

    name = "/Users/o'brien/unlearning: weekly"
    cfg = parse_params({"registry": {"experiment": name}}, source="params.yaml")
    client = registry.connect(Paths(tmp_path), cfg)
    with mlflow.start_run(tags={"batch_id": "b0001-x"}) as run:
        pass
    client.set_terminated(run.info.run_id, "RUNNING")
    assert client.get_experiment_by_name(name) is not None
    assert registry.close_stale_runs(client, name, "b0001-x") == [run.info.run_id]


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("gates: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_a_retain_sample_admits_the_methods_that_take_one():
    cfg = parse_params({"unlearn": {"retain_fraction": 0.01, "fallback": [
        {"method": "l2ul", "params": {"max_steps": 900}}, {"method": "retrain-exact"}]}})
    assert cfg.unlearn.retain_fraction == 0.01
    assert parse_params({"unlearn": {"method": "scrub", "retain_fraction": 0.005}})


def test_overrides_are_validated():
    cfg = PipelineParams()
    assert cfg.with_overrides("pretrain", epochs=3, seed=None).pretrain.epochs == 3
    with pytest.raises(ParamsError, match="pretrain.epochs"):
        cfg.with_overrides("pretrain", epochs=-1)


def test_params_file_round_trips_through_yaml():
    data = yaml.safe_load(PROJECT_PARAMS.read_text())
    assert parse_params(data).model_dump() == load_params(PROJECT_PARAMS).model_dump()
