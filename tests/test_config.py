"""params.yaml's typed sections: every option range-checked at load time and by Params.validate()."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from graphtune.checks import (
    Check, boolean, choice, hinted, integer, list_of, mapping, number, optional, per_stage, text,
)
from graphtune.config import SECTIONS, Params, load_params
from graphtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, overrides)
    return str(err.value)


# ----------------------------------------------------------------------------- the repository's params.yaml
def test_repo_params_yaml_loads_with_its_documented_values():
    params = load_params(PARAMS)
    assert params.train.lrs == [0.003, 0.001] and params.train.clip_grad == 5.0 and params.train.amp == "auto"
    assert params.transfer.prompt_days == 0.0
    assert (params.score.ref_finetune_tflops, params.score.ref_trainable_m, params.score.ref_size_mb,
            params.score.ref_infer_gflops) == (10.0, 0.1, 1.0, 1.0)
    assert params.validate() is params


def test_repo_params_yaml_lists_every_option_of_every_section():
    data = yaml.safe_load(PARAMS.read_text())
    for name, cls in SECTIONS.items():
        assert set(data[name]) == {f.name for f in dataclasses.fields(cls)}, name


@pytest.mark.parametrize("name", list(SECTIONS))
def test_every_option_declares_a_check_that_its_default_passes(name):
    section = SECTIONS[name]()
    for f in dataclasses.fields(section):
        check = f.metadata.get("check")
        assert isinstance(check, Check), f"{name}.{f.name} declares no check"
        assert check(getattr(section, f.name), f"{name}.{f.name}") == getattr(section, f.name)


# ----------------------------------------------------------------------------- rejected values
@pytest.mark.parametrize("override, message", [
    ("train.clip_grad=-1", "train.clip_grad: expected null or a finite number > 0, got -1; use null to disable"),
    ("train.clip_grad=0", "train.clip_grad: expected null or a finite number > 0, got 0; use null to disable"),
    ("train.lrs=[inf]", "train.lrs[0]: expected a finite number > 0, got inf"),
    ("train.lrs=[0.01,.nan]", "train.lrs[1]: expected a finite number > 0, got nan"),
    ("train.lrs=inf", "train.lrs: expected a finite number > 0, or a non-empty list of them (one per stage), got inf"),
    ("train.weight_decay=-1", "train.weight_decay: expected a finite number >= 0, got -1"),
    ("train.batch_size=0", "train.batch_size: expected an integer >= 1, got 0"),
    ("train.batch_size=true", "train.batch_size: expected an integer >= 1, got True"),
    ("train.batch_size=32.5", "train.batch_size: expected an integer >= 1, got 32.5"),
    ("train.epochs=[0]", "train.epochs[0]: expected an integer >= 1, got 0"),
    ("train.amp=maybe", "train.amp: expected one of auto, on, off, got 'maybe'"),
    ("train.early_stop_patience=-1", "train.early_stop_patience: expected an integer >= 0, got -1"),
    ("transfer.fractions=[0.5,1.5]", "transfer.fractions[1]: expected a finite number in (0, 1], got 1.5"),
    ("transfer.fractions=[0]", "transfer.fractions[0]: expected a finite number in (0, 1], got 0"),
    ("transfer.fractions=[]", "transfer.fractions: expected a non-empty list, each item a finite number in (0, 1], "
                              "got []"),
    ("transfer.fewshot_mode=all", "transfer.fewshot_mode: expected one of subset, steps, both, got 'all'"),
    ("transfer.prompt_days=-1", "transfer.prompt_days: expected a finite number >= 0, got -1"),
    ("experiment.seed=-1", "experiment.seed: expected an integer >= 0, got -1"),
    ("experiment.datasets=[]", "experiment.datasets: expected a non-empty list, each item a non-empty string, got []"),
    ("experiment.model_kwargs=[1]", "experiment.model_kwargs: expected a mapping, got [1]"),
    ("budgets.time_sec=0", "budgets.time_sec: expected null or a finite number > 0, got 0"),
    ("budgets.enforce=1", "budgets.enforce: expected true or false, got 1"),
    ("score.w_eff=-0.1", "score.w_eff: expected a finite number >= 0, got -0.1"),
    ("score.ref_size_mb=0", "score.ref_size_mb: expected a finite number > 0, got 0"),
    ("prepare.t_in=0", 'prepare.t_in: expected an integer number of steps >= 1 or a duration such as "1h", '
                            '"90min", "2d", got 0'),
    ("prepare.data_source=ftp", "prepare.data_source: expected one of local, url, hf, auto, got 'ftp'"),
    ("prepare.split=[0.5,0.5,0.5]",
     "prepare.split: expected three positive fractions summing to 1, got [0.5, 0.5, 0.5]"),
    ("prepare.split=[0.7,0.3]", "prepare.split: expected three positive fractions summing to 1, got [0.7, 0.3]"),
    ("prepare.normalized_k=1", "prepare.normalized_k: expected a finite number in [0, 1), got 1"),
    ("tracking.experiment_name=", "tracking.experiment_name: expected a non-empty string, got ''"),
])
def test_out_of_range_option_is_one_line_naming_it(override, message):
    assert _error([override]) == message


def test_a_bad_value_in_the_file_itself_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  weight_decay: -1\n")
    with pytest.raises(ConfigError, match=r"^train\.weight_decay: expected a finite number >= 0, got -1$"):
        load_params(path)


def test_validate_rechecks_attributes_set_after_loading():
    params = load_params(None)
    params.train.clip_grad = -1.0  # what a CLI option does after load_params
    with pytest.raises(ConfigError, match=r"^train\.clip_grad: expected null or a finite number > 0, got -1\.0;"):
        params.validate()
    params.train.clip_grad = None  # null disables clipping
    params.experiment.model_kwargs = {"hidden": 16}
    assert params.validate() is params
    params.cities = ["not", "a", "mapping"]
    with pytest.raises(ConfigError, match=r"^cities: expected a mapping, got \['not', 'a', 'mapping'\]$"):
        params.validate()


def test_validate_rejects_a_section_of_the_wrong_type():
    params = Params()
    params.train = {"epochs": [1]}
    with pytest.raises(ConfigError, match=r"^params section 'train': expected a TrainConfig, got dict$"):
        params.validate()


# ----------------------------------------------------------------------------- overrides
def test_overrides_parse_into_the_option_types():
    params = load_params(PARAMS, [
        "train.lrs=[1e-3,5e-4]", "train.epochs=4", "train.weight_decay=1e-5", "train.clip_grad=null",
        "budgets.time_sec=60", "budgets.enforce=true", "experiment.name=123", "experiment.datasets=[a,b]",
        "experiment.model_kwargs={hidden: 16}", "transfer.prompt_days=1.5", "score.ref_finetune_tflops=2e1",
    ])
    got = [params.train.lrs, params.train.epochs, params.train.weight_decay, params.train.clip_grad,
           params.budgets.time_sec, params.budgets.enforce, params.experiment.name, params.experiment.datasets,
           params.experiment.model_kwargs, params.transfer.prompt_days, params.score.ref_finetune_tflops]
    assert got == [[0.001, 0.0005], 4, 1e-5, None, 60, True, "123", ["a", "b"], {"hidden": 16}, 1.5, 20.0]
    assert [type(v) for v in got] == [list, int, float, type(None), int, bool, str, list, dict, float, float]


def test_string_options_keep_numeric_looking_text():
    params = load_params(PARAMS, ["experiment.datasets=[1e3]", "compare.filter=inf"])
    assert params.experiment.datasets == ["1e3"] and params.compare.filter == "inf"


# ----------------------------------------------------------------------------- the checks themselves
def test_number_is_finite_and_never_a_bool():
    check = number(min=0, max=1, max_open=True)
    assert check.description == "a finite number in [0, 1)"
    assert [check(v, "x") for v in (0, 0.5, 0.999)] == [0, 0.5, 0.999]  # an int is a number
    for bad in (1, 1.0, -0.1, math.nan, math.inf, True, "0.5", None):
        with pytest.raises(ConfigError, match=r"^x: expected a finite number in \[0, 1\), got "):
            check(bad, "x")
    assert number(min=0, min_open=True).description == "a finite number > 0"
    assert number(max=1, max_open=True).description == "a finite number < 1"
    assert number()(-math.pi, "x") == -math.pi


def test_integer_boolean_choice_text_mapping():
    assert integer(min=1, max=3).description == "an integer in [1, 3]"
    assert integer(min=1, max=3)(3, "n") == 3
    for bad in (0, 4, 2.0, False):
        with pytest.raises(ConfigError):
            integer(min=1, max=3)(bad, "n")
    assert boolean()(False, "b") is False
    with pytest.raises(ConfigError, match=r"^b: expected true or false, got 0$"):
        boolean()(0, "b")
    with pytest.raises(ConfigError, match=r"^c: expected one of 1, 2, got True$"):
        choice(1, 2)(True, "c")  # type-exact: True is not 1
    assert text()("", "t") == "" and text(nonempty=True)("x", "t") == "x"
    with pytest.raises(ConfigError, match=r"^t: expected a non-empty string, got ''$"):
        text(nonempty=True)("", "t")
    assert mapping()({}, "m") == {}


def test_containers_name_the_failing_item():
    assert optional(integer(min=1))(None, "o") is None
    with pytest.raises(ConfigError, match=r"^o: expected null or an integer >= 1, got 0$"):
        optional(integer(min=1))(0, "o")
    with pytest.raises(ConfigError, match=r"^l\[2\]: expected an integer >= 1, got 0$"):
        list_of(integer(min=1))([1, 2, 0], "l")
    with pytest.raises(ConfigError, match=r"^l: expected a list of at least 2 items, each item an integer, got \[1\]$"):
        list_of(integer(), min_len=2)([1], "l")
    assert list_of(text(), min_len=0)([], "l") == []
    stages = per_stage(integer(min=1))
    assert stages(3, "e") == 3 and stages([3, 1], "e") == [3, 1]
    with pytest.raises(ConfigError, match=r"^e\[1\]: expected an integer >= 1, got 0$"):
        stages([3, 0], "e")
    with pytest.raises(ConfigError, match=r"^o\[0\]: expected a finite number, got 'a'$"):
        optional(list_of(number()))(["a"], "o")
    with pytest.raises(ConfigError, match=r"^h: expected an integer, got 'x'; try again$"):
        hinted(integer(), "try again")("x", "h")


def test_params_yaml_states_exactly_the_defaults_of_config_py():
    """Defaults live in config.py; params.yaml (what DVC tracks and users edit) restates them, never differs."""
    from pathlib import Path

    from graphtune.config import Params, load_params

    repo = Path(__file__).resolve().parents[1]
    assert load_params(repo / "params.yaml").as_dict() == Params().as_dict()
