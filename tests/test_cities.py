"""The city table: registered fact blocks agree with what `prepare` measures, user entries are checked key by
key, and `graphtune cities` lists every city's facts, user cities' from their processed meta.json."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from graphtune.cli import cli
from graphtune.config import PrepareConfig
from graphtune.data.cities import DEFAULT_MAPE_FLOOR, REGISTERED, city_from_dict, city_table, get_city
from graphtune.data.prepare import prepare_dataset, write_processed
from graphtune.errors import ConfigError, DataNotice

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = sorted(name for name, spec in REGISTERED.items() if spec.directory.startswith("data/sample/"))


def test_the_embedded_cities_are_the_sample_folders():
    assert EMBEDDED == ["metr-la-east", "metr-la-r1", "metr-la-r2", "metr-la-r3", "metr-la-r4", "metr-la-r5",
                        "metr-la-week", "metr-la-west", "montevideo-bus"]


@pytest.mark.parametrize("name", EMBEDDED)
def test_fact_blocks_of_the_embedded_cities_are_what_prepare_measures(name):
    spec = REGISTERED[name]
    bundle = prepare_dataset(name, root=REPO, use_processed=False)
    meta = bundle.meta
    assert spec.facts["shape"] == meta["shape"]
    assert spec.facts["interval_minutes"] == meta["interval_minutes"]
    assert spec.facts["missing_share"] == meta["missing_share"]
    assert spec.facts["edges"] == meta["graph"]["edges"]
    assert spec.facts["date_range"] == [meta["start"][:16], meta["end"][:16]]
    for role, remote in spec.files().items():  # registered hashes are the embedded files' own
        assert hashlib.sha256(Path(REPO, spec.directory, remote.name).read_bytes()).hexdigest() == remote.sha256, role


def test_registered_cities_state_their_null_values():
    assert all(spec.null_value_stated for spec in REGISTERED.values())
    assert {name: spec.null_value for name, spec in REGISTERED.items()} == {
        "metr-la": 0.0, "pems-bay": 0.0, "metr-la-week": 0.0, "metr-la-west": 0.0, "metr-la-east": 0.0,
        **{f"metr-la-r{r}": 0.0 for r in range(1, 6)}, "montevideo-bus": None}
    bus = REGISTERED["montevideo-bus"]
    assert (bus.units, bus.interval_minutes, bus.graph_format, bus.mape_floor) == ("boardings/hour", 60, "links", 1.0)


# ----------------------------------------------------------------------------- user entries
def test_a_user_entry_states_its_null_value_only_by_writing_it():
    base = {"series": "s.csv"}
    assert not city_from_dict("a", base).null_value_stated
    assert city_from_dict("a", {**base, "null_value": 0}).null_value_stated
    none = city_from_dict("a", {**base, "null_value": None})
    assert none.null_value is None and none.null_value_stated
    assert city_from_dict("a", base).mape_floor == DEFAULT_MAPE_FLOOR == 1.0


@pytest.mark.parametrize("key,value,says", [
    ("null_value", "zero", "cities.toy.null_value: expected null or a finite number, got 'zero'"),
    ("null_value", True, "cities.toy.null_value: expected null or a finite number, got True"),
    ("mape_floor", -1, "cities.toy.mape_floor: expected a finite number >= 0, got -1"),
    ("mape_floor", None, "cities.toy.mape_floor: expected a finite number >= 0, got None"),
    ("nan_as_missing", "yes", "cities.toy.nan_as_missing: expected true or false, got 'yes'"),
    ("interval_minutes", 0, "cities.toy.interval_minutes: expected null or a finite number > 0, got 0"),
    ("series_options", [1], "cities.toy.series_options: expected a mapping, got [1]"),
])
def test_bad_entry_values_are_one_line_naming_the_key(key, value, says):
    with pytest.raises(ConfigError) as info:
        get_city("toy", {"toy": {"series": "s.csv", key: value}})
    assert str(info.value) == says


def test_the_region_sub_cities_are_registered_like_west_and_east():
    week = REGISTERED["metr-la-week"]
    for r in range(1, 6):
        spec = REGISTERED[f"metr-la-r{r}"]
        assert spec.subset == {"parent": "metr-la-week", "regions": 5, "region": r}
        assert spec.files() == week.files() and spec.directory == week.directory
        assert spec.description == (f"Embedded real sample: region {r} of 5 of the METR-LA week's sensors "
                                    f"(k-means on coordinates)")
    assert [REGISTERED[f"metr-la-r{r}"].facts["shape"] for r in range(1, 6)] == [
        [2016, 36], [2016, 28], [2016, 52], [2016, 51], [2016, 40]]
    assert [REGISTERED[f"metr-la-r{r}"].facts["edges"] for r in range(1, 6)] == [205, 135, 353, 395, 194]


def test_a_user_region_sub_city_takes_its_parents_files_and_reading_options():
    spec = get_city("mine", {"mine": {"subset": {"parent": "metr-la-week", "regions": 4, "region": 2}}})
    week = REGISTERED["metr-la-week"]
    assert spec.subset == {"parent": "metr-la-week", "regions": 4, "region": 2}
    assert spec.files() == week.files() and spec.series_options == week.series_options
    assert spec.null_value == 0.0 and spec.null_value_stated and spec.units == "mph" and spec.facts == {}


_WEEK = {"parent": "metr-la-week"}


@pytest.mark.parametrize("subset,says", [
    ({**_WEEK, "regions": 1, "region": 1}, "cities.toy.subset.regions: expected an integer >= 2, got 1"),
    ({**_WEEK, "regions": "4", "region": 1}, "cities.toy.subset.regions: expected an integer >= 2, got '4'"),
    ({**_WEEK, "regions": 4.0, "region": 1}, "cities.toy.subset.regions: expected an integer >= 2, got 4.0"),
    ({**_WEEK, "regions": True, "region": 1}, "cities.toy.subset.regions: expected an integer >= 2, got True"),
    ({**_WEEK, "regions": 4, "region": 0}, "cities.toy.subset.region: expected an integer in [1, 4], got 0"),
    ({**_WEEK, "regions": 4, "region": 5}, "cities.toy.subset.region: expected an integer in [1, 4], got 5"),
    ({**_WEEK, "regions": 4, "region": 1.5}, "cities.toy.subset.region: expected an integer in [1, 4], got 1.5"),
    ({**_WEEK, "regions": 4}, "cities.toy.subset.region: expected an integer in [1, 4], got None"),
    ({**_WEEK, "side": "west", "regions": 4, "region": 1},
     "cities.toy.subset: expected exactly one of 'side' (west or east) or 'regions' (with 'region'), got both"),
    ({**_WEEK}, "cities.toy.subset: expected exactly one of 'side' (west or east) or 'regions' (with 'region'), "
                "got neither"),
    ({**_WEEK, "region": 2}, "cities.toy.subset: expected exactly one of 'side' (west or east) or 'regions' "
                             "(with 'region'), got neither"),
    ({**_WEEK, "side": "west", "region": 2}, "cities.toy.subset.region: goes with 'regions', not with 'side'"),
    ({**_WEEK, "side": "north"}, "cities.toy.subset.side: expected one of west, east, got 'north'"),
    ({**_WEEK, "regions": 4, "region": 1, "k": 4},
     "cities.toy.subset: unknown key(s) k; allowed: parent, side, regions, region"),
    ({"regions": 4, "region": 1}, "cities.toy.subset.parent: expected a non-empty string, got None"),
    ({"parent": "metr-la-west", "regions": 4, "region": 1},
     "cities.toy.subset.parent: metr-la-west is itself a sub-city (of metr-la-week); name a city that is not"),
])
def test_bad_subsets_are_one_line_naming_the_key(subset, says):
    with pytest.raises(ConfigError) as info:
        get_city("toy", {"toy": {"subset": subset}})
    assert str(info.value) == says


# ----------------------------------------------------------------------------- the listing
def _toy_city(tmp_path: Path) -> dict:
    """A 15-minute km/h city without coordinates or facts, 25% of its readings 0 (its stated null value)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    index = pd.date_range("2024-03-04", periods=300, freq="15min")
    values = np.random.default_rng(0).uniform(20, 60, (300, 4)).round(2)
    values[:, 0] = 0.0
    pd.DataFrame(values, index=pd.Index(index, name="time"), columns=list("abcd")).to_csv(raw / "series.csv")
    np.savetxt(raw / "adj.csv", np.eye(4) + np.eye(4, k=1), delimiter=",")
    return {"toy": {"directory": str(raw), "series": "series.csv", "graph": "adj.csv", "graph_format": "dense",
                    "units": "km/h", "null_value": 0, "description": "a user city"}}


def test_city_table_shows_a_user_city_from_its_meta_once_prepared(tmp_path):
    cities = _toy_city(tmp_path)
    before = {row["name"]: row for row in city_table(cities, processed_dir="processed", root=str(tmp_path))}
    assert before["toy"] == {"name": "toy", "nodes": "?", "steps": "?", "interval": "? min", "units": "km/h",
                             "missing": "?", "edges": "?", "description": "a user city"}
    with pytest.warns(DataNotice, match="spectral coordinates"):  # no locations: positions from the graph
        write_processed("toy", PrepareConfig(processed_dir=str(tmp_path / "processed")), root=tmp_path, cities=cities)
    after = {row["name"]: row for row in city_table(cities, processed_dir="processed", root=str(tmp_path))}
    assert after["toy"] == {"name": "toy", "nodes": "4", "steps": "300", "interval": "15 min", "units": "km/h",
                            "missing": "25%", "edges": "3", "description": "a user city"}
    assert after["montevideo-bus"] == {
        "name": "montevideo-bus", "nodes": "675", "steps": "744", "interval": "60 min", "units": "boardings/hour",
        "missing": "0%", "edges": "690", "description": REGISTERED["montevideo-bus"].description}
    assert after["pems-bay"]["missing"] == "0.003%" and after["metr-la"]["missing"] == "8.1%"


def test_graphtune_cities_lists_every_city_with_its_facts(tmp_path):
    cities = _toy_city(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"processed_dir": str(tmp_path / "processed")}, "cities": cities}))
    with pytest.warns(DataNotice, match="spectral coordinates"):
        assert CliRunner().invoke(cli, ["prepare", "--city", "toy", "--params", str(params)]).exit_code == 0
    result = CliRunner().invoke(cli, ["cities", "--params", str(params)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["city", "nodes", "steps", "interval", "units", "missing", "edges", "description"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(REGISTERED) | {"toy"}
    assert rows["toy"][:8] == ["toy", "4", "300", "15", "min", "km/h", "25%", "3"]
    assert rows["montevideo-bus"][:8] == ["montevideo-bus", "675", "744", "60", "min", "boardings/hour", "0%", "690"]
    assert rows["metr-la"][:8] == ["metr-la", "207", "34272", "5", "min", "mph", "8.1%", "1515"]
    assert [rows[f"metr-la-r{r}"][:8] for r in range(1, 6)] == [
        [f"metr-la-r{r}", nodes, "2016", "5", "min", "mph", "0%", edges]
        for r, nodes, edges in [(1, "36", "205"), (2, "28", "135"), (3, "52", "353"), (4, "51", "395"),
                                (5, "40", "194")]]
    assert " ".join(rows["metr-la-r3"][8:]) == REGISTERED["metr-la-r3"].description
    params.write_text(yaml.safe_dump({"cities": {"toy": {"series": "s.csv", "mape_floor": -1}}}))
    result = CliRunner().invoke(cli, ["cities", "--params", str(params)])
    assert result.exit_code == 2
    assert result.output.strip() == "graphtune: error: cities.toy.mape_floor: expected a finite number >= 0, got -1"


def test_a_transfer_stage_onto_the_count_city(repo_root):
    """METR-LA speeds -> Montevideo boardings (hourly counts, real zeros): finite metrics, WAPE, MAPE over the
    readings above the floor only, lead times named in hours of minutes, the seasonal model at HA's level."""
    from graphtune.config import ExperimentConfig, PrepareConfig, TrainConfig, TransferConfig
    from graphtune.data.prepare import prepare_dataset
    from graphtune.transfer.stages import run_experiment

    source = prepare_dataset("metr-la-west", PrepareConfig(stride=8), root=repo_root, use_processed=False)
    target = prepare_dataset("montevideo-bus", root=repo_root, use_processed=False)
    result = run_experiment([source, target], ExperimentConfig(model="baseline", model_kwargs={"seasonal": True}),
                            TrainConfig(epochs=[1], lrs=[0.003, 0.001]), TransferConfig(fractions=[1.0]))
    stage = result.stages[1]
    test = stage.test
    assert all(math.isfinite(test[k]) for k in ("mae", "rmse", "wape", "mape"))
    assert 0 < test["mape_count"] < test["count"] == 126 * 12 * 675  # zeros have no percentage error
    assert {"mae_180min", "wape_360min", "rmse_720min"} <= set(test)  # 12 hourly steps: 3 h, 6 h, 12 h ahead
    # at the full budget a seasonal model starts from the city's own historical average and keeps what helps
    assert test["mae"] <= stage.reference["ha"]["mae"] + 1e-9
    assert stage.reference["persistence"]["mae"] > stage.reference["ha"]["mae"]
