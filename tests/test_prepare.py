"""prepare_dataset / write_processed on the real sample and tiny generated cities, and every bad input."""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

import graphtune.data.prepare as prep
from graphtune.cli import cli
from graphtune.config import PrepareConfig
from graphtune.data.cities import REGISTERED, CitySpec, get_city
from graphtune.data.fetch import RemoteFile
from graphtune.data.prepare import (
    FORMAT_VERSION, kmeans_regions, local_plane_km, prepare_dataset, time_features, write_processed,
)
from graphtune.errors import ConfigError, DataError, DataNotice
from graphtune.fileio import MANIFEST

REPO = Path(__file__).resolve().parents[1]
WEEK = REPO / "data" / "sample" / "metr-la-week"
MONTEVIDEO = REPO / "data" / "sample" / "montevideo-bus"


# ----------------------------------------------------------------------------- the real sample
def test_week_bundle_facts(week_bundle):
    b = week_bundle
    assert (b.num_steps, b.num_nodes) == (2016, 207)
    assert b.interval_minutes == 5.0 and b.steps_per_day == 288
    assert b.splits == {"train": (0, 1411), "val": (1411, 1613), "test": (1613, 2016)}
    raw = pd.read_hdf(WEEK / "metr-la-week.h5")
    assert b.sensor_ids == list(raw.columns)
    np.testing.assert_array_equal(b.target.numpy(), raw.to_numpy(np.float32))
    # scaler from the training rows only, checked with numbers
    train = raw.to_numpy()[:1411]
    assert b.scaler.mean == pytest.approx(train.mean(), rel=1e-9)
    assert b.scaler.std == pytest.approx(train.std(), rel=1e-6)
    assert b.scaler.mean != pytest.approx(raw.to_numpy().mean(), rel=1e-4)
    # time features from the real timestamps: 2012-03-01 was a Thursday
    assert b.time_features[0].tolist() == [0.0, 3.0]
    assert b.time_features[12, 0].item() == pytest.approx(60 / 1440)
    with open(WEEK / "adj_mx.pkl", "rb") as f:
        ids, _, adj = pickle.load(f, encoding="latin1")
    np.testing.assert_array_equal(b.adj, adj)
    assert b.coords.shape == (207, 2) and np.isfinite(b.coords).all()
    assert b.num_windows("train") == 1411 - 23 and b.num_windows("test") == 403 - 23


def test_geographic_sub_cities_are_induced_subgraphs(week_bundle):
    west = prepare_dataset("metr-la-west", root=REPO, use_processed=False)
    east = prepare_dataset("metr-la-east", root=REPO, use_processed=False)
    assert (west.num_nodes, east.num_nodes) == (103, 104)
    assert set(west.sensor_ids).isdisjoint(east.sensor_ids)
    assert set(west.sensor_ids) | set(east.sensor_ids) == set(week_bundle.sensor_ids)
    assert west.coords[:, 1].max() < east.coords[:, 1].min()
    idx = [week_bundle.sensor_ids.index(s) for s in east.sensor_ids]
    np.testing.assert_array_equal(east.adj, week_bundle.adj[np.ix_(idx, idx)])
    np.testing.assert_array_equal(east.target.numpy(), week_bundle.target.numpy()[:, idx])
    assert east.scaler != week_bundle.scaler  # each sub-city fits its own scaler on its own training part


REGIONS = [f"metr-la-r{r}" for r in range(1, 6)]


@pytest.fixture(scope="module")
def region_bundles():
    """metr-la-r1 .. metr-la-r5 read from the raw files."""
    return [prepare_dataset(name, root=REPO, use_processed=False) for name in REGIONS]


def test_region_sub_cities_partition_the_week_into_induced_subgraphs(week_bundle, region_bundles):
    week_ids = week_bundle.sensor_ids
    assert [b.num_nodes for b in region_bundles] == [36, 28, 52, 51, 40]
    assert [b.meta["graph"]["edges"] for b in region_bundles] == [205, 135, 353, 395, 194]
    ids = [s for b in region_bundles for s in b.sensor_ids]
    assert len(ids) == len(set(ids)) == 207 and set(ids) == set(week_ids)  # disjoint, and every sensor once
    for b in region_bundles:
        idx = [week_ids.index(s) for s in b.sensor_ids]
        assert idx == sorted(idx)  # the parent's order
        np.testing.assert_array_equal(b.adj, week_bundle.adj[np.ix_(idx, idx)])
        np.testing.assert_array_equal(b.target.numpy(), week_bundle.target.numpy()[:, idx])
        np.testing.assert_array_equal(b.coords, week_bundle.coords[idx])
        assert b.meta["subset"]["regions"] == 5 and b.meta["start"] == "2012-03-01 00:00:00"
    centroids = [b.coords[:, 1].mean() for b in region_bundles]  # numbered west to east
    assert centroids == sorted(centroids) and len(set(centroids)) == 5


def test_regions_follow_the_documented_definition_and_are_deterministic(week_bundle, region_bundles):
    coords = week_bundle.coords
    labels = kmeans_regions(coords, 5)
    np.testing.assert_array_equal(labels, kmeans_regions(coords.copy(), 5))  # two computations agree
    for r, b in enumerate(region_bundles, start=1):
        assert [week_bundle.sensor_ids[i] for i in np.flatnonzero(labels == r)] == b.sensor_ids
    # km on the local plane: one hundredth of a degree east / north of the mean position
    plane = local_plane_km(np.array([[34.0, -118.0], [34.0, -117.99], [34.01, -118.0]]))
    mean_lat = 34.0 + 0.01 / 3
    assert plane[1, 0] - plane[0, 0] == pytest.approx(0.01 * 111.32 * np.cos(np.radians(mean_lat)), rel=1e-9)
    assert plane[2, 1] - plane[0, 1] == pytest.approx(0.01 * 110.57, rel=1e-9)
    np.testing.assert_allclose(plane.mean(axis=0), 0.0, atol=1e-12)
    # each sensor lies in the region of its nearest k-means centre: compact clusters, not longitude bands
    points = local_plane_km(coords)
    centres = np.array([points[labels == r].mean(axis=0) for r in range(1, 6)])
    nearest = np.argmin(((points[:, None, :] - centres[None]) ** 2).sum(-1), axis=1) + 1
    np.testing.assert_array_equal(nearest, labels)
    assert np.all(np.diff(centres[:, 0]) > 0)


@pytest.mark.parametrize("region", [1, 4])
def test_a_yaml_region_sub_city_is_the_registered_one(region, region_bundles):
    cities = {"mine": {"subset": {"parent": "metr-la-week", "regions": 5, "region": region}}}
    mine = prepare_dataset("mine", root=REPO, cities=cities, use_processed=False)
    _assert_same_bundle(mine, region_bundles[region - 1])
    assert mine.meta["graph"] == region_bundles[region - 1].meta["graph"]


def test_a_region_sub_city_from_params_through_the_cli(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"processed_dir": str(tmp_path / "processed")}, "cities": {
        "my-region": {"subset": {"parent": "metr-la-week", "regions": 4, "region": 2}}}}))
    result = CliRunner().invoke(cli, ["prepare", "--city", "my-region", "--params", str(params)])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "processed" / "my-region" / "meta.json").read_text())
    assert meta["shape"] == [2016, 52] and meta["subset"] == {"parent": "metr-la-week", "regions": 4, "region": 2}
    params.write_text(yaml.safe_dump({"cities": {"toy": {"subset": {"parent": "metr-la-week", "regions": 4,
                                                                     "region": 9}}}}))
    assert _run_bad(tmp_path, params) == ("graphtune: error: cities.toy.subset.region: expected an integer in "
                                          "[1, 4], got 9")


def test_more_regions_than_sensors_is_one_line():
    cities = {"toy": {"subset": {"parent": "metr-la-week", "regions": 208, "region": 1}}}
    with pytest.raises(DataError) as info:
        prepare_dataset("toy", root=REPO, cities=cities, use_processed=False)
    assert str(info.value) == ("city toy: subset.regions = 208 is more than the 207 sensors of metr-la-week; "
                               "use at most 207 regions")


def _parent_city(monkeypatch, tmp_path, locations: bool) -> None:
    """Register `toy-parent`: _write_city's four sensors, with or without its locations file."""
    _write_city(tmp_path / "raw")
    monkeypatch.setitem(REGISTERED, "toy-parent", CitySpec(
        name="toy-parent", directory=str(tmp_path / "raw"), series=RemoteFile("series.csv"),
        graph=RemoteFile("adj.csv"), graph_format="dense", locations=RemoteFile("locations.csv") if locations else None,
        units="km/h", null_value=0.0, null_value_stated=True))


def test_a_region_sub_city_of_a_parent_without_coordinates_is_one_line(tmp_path, monkeypatch):
    _parent_city(monkeypatch, tmp_path, locations=False)
    cities = {"toy": {"subset": {"parent": "toy-parent", "regions": 2, "region": 1}}}
    with pytest.raises(DataError) as info:
        prepare_dataset("toy", root=tmp_path, cities=cities, use_processed=False)
    assert str(info.value) == "city toy: the geographic split needs coordinates for every sensor (no locations file)"


def test_more_regions_than_distinct_positions_is_one_line(tmp_path, monkeypatch):
    _parent_city(monkeypatch, tmp_path, locations=True)
    loc = pd.read_csv(tmp_path / "raw" / "locations.csv", index_col=0)
    loc[["latitude", "longitude"]] = [[34.0, -118.0], [34.0, -118.0], [34.1, -118.1], [34.1, -118.1]]
    loc.to_csv(tmp_path / "raw" / "locations.csv")
    cities = {f"toy{k}": {"subset": {"parent": "toy-parent", "regions": k, "region": 1}} for k in (2, 3)}
    two = prepare_dataset("toy2", root=tmp_path, cities=cities, use_processed=False)
    assert two.sensor_ids == ["s2", "s3"]  # region 1: the western pair
    with pytest.raises(DataError) as info:
        prepare_dataset("toy3", root=tmp_path, cities=cities, use_processed=False)
    assert str(info.value) == ("city toy3: subset.regions = 3 is more than the 2 distinct sensor positions of "
                               "toy-parent; use at most 2 regions")


def test_montevideo_bus_is_prepared_with_its_real_zeros_and_every_link(tmp_path):
    """The embedded count city: hourly boardings, 80% real zeros (null_value None), 690 links read as 0/1."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataNotice)  # nothing to report: every stop linked, locations known
        out = write_processed("montevideo-bus", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shape"] == [744, 675] and meta["interval_minutes"] == 60.0
    assert (meta["start"], meta["end"]) == ("2020-10-01 00:00:00", "2020-10-31 23:00:00")
    assert meta["null_value"] is None and meta["missing_share"] == 0.0 and meta["mape_floor"] == 1.0
    assert meta["graph"] == {"edges": 690, "isolated": 0, "components": 1}
    assert meta["coords_source"] == "locations" and meta["units"] == "boardings/hour"
    assert meta["splits"] == {"train": [0, 521], "val": [521, 595], "test": [595, 744]}
    raw = pd.read_csv(MONTEVIDEO / "bus_inflow.csv", index_col="time")
    series = np.load(out / "series.npy")
    np.testing.assert_array_equal(series, raw.to_numpy(np.float32))  # no reading became NaN
    assert round(float((series == 0).mean()), 4) == 0.8041  # the zeros are kept as readings
    bundle = prepare_dataset("montevideo-bus", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    assert bundle.null_value is None and bundle.mape_floor == 1.0 and bundle.t_in_minutes == 720.0
    assert bundle.coords.shape == (675, 2) and -35 < bundle.coords[:, 0].min() < bundle.coords[:, 0].max() < -34.5


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_write_processed_is_byte_stable_and_reused(tmp_path, monkeypatch):
    out = write_processed("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    first = _digest(out)
    assert set(first) == {"series.npy", "time.npy", "adj.npy", "coords.npy", "meta.json", MANIFEST}
    assert _digest(write_processed("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)) == first
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shape"] == [2016, 104] and meta["splits"]["val"] == [1411, 1613]
    assert meta["sources"]["series"]["sha256"].startswith("6b4e7959")
    assert meta["format_version"] == FORMAT_VERSION == 4
    assert meta["arrays"] == {name: first[name] for name in ("adj.npy", "coords.npy", "series.npy", "time.npy")}
    assert json.loads((out / MANIFEST).read_text()) == {
        "files": ["adj.npy", "coords.npy", "meta.json", "series.npy", "time.npy"], "writer": "graphtune"}
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind

    calls = []
    real = prep._process
    monkeypatch.setattr(prep, "_process", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    assert calls == []  # current processed folder: raw files not read
    fresh = prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO, use_processed=False)
    np.testing.assert_array_equal(cached.values.numpy(), fresh.values.numpy())
    prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path), split=[0.6, 0.2, 0.2]), root=REPO)
    assert len(calls) == 2  # other options -> stale -> read from raw


def test_a_region_sub_city_is_written_byte_stable(tmp_path):
    first = _digest(write_processed("metr-la-r2", PrepareConfig(processed_dir=str(tmp_path)), root=REPO))
    assert _digest(write_processed("metr-la-r2", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)) == first
    meta = json.loads((tmp_path / "metr-la-r2" / "meta.json").read_text())
    assert meta["options"]["city"]["subset"] == {"parent": "metr-la-week", "region": 2, "regions": 5}


# ----------------------------------------------------------------------------- processed arrays are verified
def _spy_process(monkeypatch) -> list:
    calls = []
    real = prep._process
    monkeypatch.setattr(prep, "_process", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _assert_same_bundle(a, b) -> None:
    np.testing.assert_array_equal(a.values.numpy(), b.values.numpy())
    np.testing.assert_array_equal(a.target.numpy(), b.target.numpy())  # NaN (missing) counts as equal
    np.testing.assert_array_equal(a.adj, b.adj)
    np.testing.assert_array_equal(a.coords, b.coords)
    assert a.scaler == b.scaler and a.splits == b.splits and a.sensor_ids == b.sensor_ids


def _notices(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DataNotice)]


def test_array_overwritten_in_place_is_detected_and_rebuilt(tmp_path, monkeypatch):
    out = write_processed("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    good_files = _digest(out)
    good = prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    size = (out / "series.npy").stat().st_size
    series = np.load(out / "series.npy")
    np.save(out / "series.npy", series[::-1].copy())  # same shape, dtype and size; other bytes
    assert (out / "series.npy").stat().st_size == size
    assert _digest(out)["series.npy"] != good_files["series.npy"]
    calls = _spy_process(monkeypatch)
    with pytest.warns(DataNotice) as record:
        rebuilt = prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    assert _notices(record) == [f"{out}/series.npy: contents differ from meta.json (changed after prepare); "
                                f"rebuilt {out} from the raw files"]
    assert calls == [1]
    _assert_same_bundle(rebuilt, good)
    assert rebuilt.meta == good.meta  # including the array hashes of the rewritten folder
    assert _digest(out) == good_files  # rewritten byte for byte as `prepare` writes it
    assert not list(tmp_path.glob(".*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataNotice)
        again = prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)  # verifies: no notice
    assert calls == [1]  # read from the processed folder, not from raw
    _assert_same_bundle(again, good)


@pytest.mark.parametrize("damage,says", [
    ("remove coords", "coords.npy: missing (meta.json lists it)"),
    ("unlist coords", "coords.npy: not listed in meta.json's array hashes (meta.json changed after prepare)"),
    ("remove series", "series.npy: missing (meta.json lists it)"),
])
def test_missing_or_unlisted_arrays_are_rebuilt(tmp_path, damage, says):
    out = write_processed("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    good_files = _digest(out)
    if damage == "remove coords":
        (out / "coords.npy").unlink()
    elif damage == "unlist coords":
        meta = json.loads((out / "meta.json").read_text())
        del meta["arrays"]["coords.npy"]
        (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    else:
        (out / "series.npy").unlink()
    with pytest.warns(DataNotice) as record:
        prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    assert _notices(record) == [f"{out}/{says}; rebuilt {out} from the raw files"]
    assert _digest(out) == good_files


def test_rebuild_that_cannot_be_written_uses_the_arrays_in_memory(tmp_path, monkeypatch):
    out = write_processed("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    good = prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    series = np.load(out / "series.npy")
    np.save(out / "series.npy", np.full_like(series, 7.0))
    damaged = (out / "series.npy").read_bytes()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(out))

    monkeypatch.setattr(prep, "atomic_directory", read_only)
    with pytest.warns(DataNotice) as record:
        rebuilt = prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    assert _notices(record) == [
        f"{out}/series.npy: contents differ from meta.json (changed after prepare); rebuilt it from the raw "
        f"files for this run only; could not rewrite {out} (Read-only file system)"]
    _assert_same_bundle(rebuilt, good)
    assert (out / "series.npy").read_bytes() == damaged  # nothing was written


def test_format_1_folder_is_stale_silently_and_prepare_replaces_it(tmp_path, monkeypatch):
    """A folder written before array hashes existed (format 1, no manifest) is read from raw without a notice,
    and `prepare` replaces it (its files are the legacy names) with the current format."""
    out = write_processed("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    good_files = _digest(out)
    meta = json.loads((out / "meta.json").read_text())
    del meta["arrays"]
    meta["format_version"] = meta["options"]["format_version"] = 1
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    (out / MANIFEST).unlink()
    old_files = _digest(out)
    calls = _spy_process(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataNotice)
        bundle = prepare_dataset("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    assert calls == [1] and bundle.meta["format_version"] == 4
    assert _digest(out) == old_files  # stale is not damaged: the prepare stage rewrites it, not a reader
    write_processed("metr-la-east", PrepareConfig(processed_dir=str(tmp_path)), root=REPO)
    assert _digest(out) == good_files


def test_cli_prints_graphtune_notices_as_one_line():
    """Through the real interpreter: `cli`'s group body makes GraphTune's warnings one stderr line each."""
    code = (
        "import warnings\n"
        "from graphtune.cli import cli\n"
        "from graphtune.errors import DataNotice\n"
        "cli.callback()\n"
        "warnings.warn('data/processed/x/series.npy: contents differ\\nfrom meta.json', DataNotice)\n"
        "warnings.warn('someone else', DeprecationWarning)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stderr == ("graphtune: notice: data/processed/x/series.npy: contents differ from meta.json\n"
                             "<string>:6: DeprecationWarning: someone else\n")


# ----------------------------------------------------------------------------- user cities (CSV), intervals
def _write_city(folder: Path, t=300, n=4, freq="15min", start="2024-03-04 00:00", seed=0, **corrupt):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    index = pd.date_range(start, periods=t, freq=freq)
    ids = [f"s{i}" for i in range(n)]
    values = rng.uniform(10, 60, (t, n)).round(3)
    df = pd.DataFrame(values, index=index, columns=ids)
    df.index.name = "time"
    df.to_csv(folder / "series.csv")
    adj = np.eye(n) + 0.5 * np.eye(n, k=1)
    np.savetxt(folder / "adj.csv", adj, delimiter=",")
    pd.DataFrame({"sensor_id": ids, "latitude": 34 + np.arange(n) * 0.01,
                  "longitude": -118 + np.arange(n) * 0.01}).to_csv(folder / "locations.csv")
    return df


def _params(tmp_path: Path, folder: Path, **entry) -> Path:
    city = {"directory": str(folder), "series": "series.csv", "graph": "adj.csv", "graph_format": "dense",
            "locations": "locations.csv", "units": "km/h"}
    city.update(entry)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"prepare": {"processed_dir": str(tmp_path / "processed")},
                                    "cities": {"toy": city}}))
    return path


@pytest.mark.parametrize("freq,minutes,per_day", [("15min", 15.0, 96), ("1h", 60.0, 24)])
def test_user_city_from_params_with_other_intervals(tmp_path, freq, minutes, per_day):
    df = _write_city(tmp_path / "raw", freq=freq)
    params = _params(tmp_path, tmp_path / "raw")
    result = CliRunner().invoke(cli, ["prepare", "--city", "toy", "--params", str(params)])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "processed" / "toy" / "meta.json").read_text())
    assert meta["interval_minutes"] == minutes
    train = df.to_numpy()[: round(300 * 0.7)]
    assert meta["scaler"]["mean"] == pytest.approx(train.mean(), rel=1e-6)
    tf = np.load(tmp_path / "processed" / "toy" / "time.npy")
    np.testing.assert_allclose(tf, time_features(df.index))
    assert tf[per_day, 0] == 0.0 and tf[per_day, 1] == 1.0  # next midnight, Monday -> Tuesday


def test_scaler_ignores_extreme_test_values(tmp_path):
    """Leakage check: multiplying the val/test part by 1000 leaves the scaler unchanged."""
    df = _write_city(tmp_path / "a")
    base = prepare_dataset("toy", root=tmp_path, cities={"toy": {"directory": "a", "series": "series.csv",
                                                                   "graph": "adj.csv", "graph_format": "dense"}},
                           use_processed=False)
    df.iloc[210:] *= 1000
    df.to_csv(tmp_path / "a" / "series.csv")
    spiked = prepare_dataset("toy", root=tmp_path, cities={"toy": {"directory": "a", "series": "series.csv",
                                                                     "graph": "adj.csv", "graph_format": "dense"}},
                             use_processed=False)
    assert spiked.scaler == base.scaler
    assert spiked.target[-1].max() > 1000


def test_missing_locations_warn_with_names(tmp_path):
    _write_city(tmp_path / "raw")
    loc = pd.read_csv(tmp_path / "raw" / "locations.csv", index_col=0)
    loc.iloc[:3].to_csv(tmp_path / "raw" / "locations.csv")
    with pytest.warns(UserWarning, match="s3"):
        prepare_dataset("toy", root=tmp_path, use_processed=False,
                        cities={"toy": {"directory": "raw", "series": "series.csv", "graph": "adj.csv",
                                        "graph_format": "dense", "locations": "locations.csv"}})


# ----------------------------------------------------------------------------- bad input through the CLI
def _run_bad(tmp_path, params: Path, *extra):
    result = CliRunner().invoke(cli, ["prepare", "--city", "toy", "--params", str(params), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("graphtune: error:"), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "processed" / "toy").exists()
    return lines[0]


def test_bad_unknown_city(tmp_path):
    params = _params(tmp_path, tmp_path / "raw")
    result = CliRunner().invoke(cli, ["prepare", "--city", "atlantis", "--params", str(params)])
    assert result.exit_code == 2 and "unknown city 'atlantis'" in result.output and "metr-la" in result.output


def test_bad_missing_file(tmp_path):
    _write_city(tmp_path / "raw")
    (tmp_path / "raw" / "adj.csv").unlink()
    assert "adj.csv" in _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))


def test_bad_unreadable_file(tmp_path):
    _write_city(tmp_path / "raw")
    (tmp_path / "raw" / "series.h5").write_bytes(b"not an hdf5 file")
    assert "series.h5" in _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw", series="series.h5"))


def test_bad_sensor_mismatch(tmp_path):
    _write_city(tmp_path / "raw", n=4)
    np.savetxt(tmp_path / "raw" / "adj.csv", np.eye(5), delimiter=",")
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))
    assert "adj.csv" in msg


def test_bad_graph_not_square(tmp_path):
    _write_city(tmp_path / "raw")
    np.savetxt(tmp_path / "raw" / "adj.csv", np.ones((4, 3)), delimiter=",")
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))
    assert "adj.csv" in msg and "square" in msg


@pytest.mark.parametrize("bad,word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_bad_nan_or_inf_series(tmp_path, bad, word):
    df = _write_city(tmp_path / "raw")
    df.iloc[10, 2] = bad
    df.to_csv(tmp_path / "raw" / "series.csv")
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))
    assert "series.csv" in msg and word.lower() in msg.lower()


def test_nan_allowed_when_city_says_it_means_missing(tmp_path):
    df = _write_city(tmp_path / "raw")
    df.iloc[10, 2] = np.nan
    df.to_csv(tmp_path / "raw" / "series.csv")
    b = prepare_dataset("toy", root=tmp_path, use_processed=False,
                        cities={"toy": {"directory": "raw", "series": "series.csv", "graph": "adj.csv",
                                        "graph_format": "dense", "nan_as_missing": True}})
    assert bool(torch.isnan(b.target[10, 2])) and b.values[10, 2] == 0.0


def test_bad_nan_in_graph(tmp_path):
    _write_city(tmp_path / "raw")
    adj = np.eye(4)
    adj[0, 1] = np.nan
    np.savetxt(tmp_path / "raw" / "adj.csv", adj, delimiter=",")
    assert "adj.csv" in _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))


def test_bad_too_short_for_one_window(tmp_path):
    _write_city(tmp_path / "raw", t=60)
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))
    assert "fewer than one window" in msg and "toy" in msg


def test_bad_irregular_interval(tmp_path):
    df = _write_city(tmp_path / "raw")
    df.index = df.index.where(df.index != df.index[7], df.index[7] + pd.Timedelta(minutes=4))  # off the grid
    df.to_csv(tmp_path / "raw" / "series.csv")
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))
    assert "series.csv" in msg and "cannot infer the sampling interval" in msg


def test_bad_skipped_steps_unless_filled(tmp_path):
    df = _write_city(tmp_path / "raw")
    df.drop(df.index[[5, 17, 40]]).to_csv(tmp_path / "raw" / "series.csv")
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))
    assert "series.csv" in msg and "skip 3 steps" in msg
    with pytest.warns(UserWarning, match="inserted as missing"):
        b = prepare_dataset("toy", root=tmp_path, use_processed=False,
                            cities={"toy": {"directory": "raw", "series": "series.csv", "graph": "adj.csv",
                                            "graph_format": "dense", "series_options": {"fill_gaps": True},
                                            "nan_as_missing": True}})
    assert b.num_steps == 300 and bool(torch.isnan(b.target[5]).all()) and b.values[5].abs().sum() == 0


def test_bad_options():
    with pytest.raises(ConfigError, match="prepare.split"):
        prepare_dataset("metr-la-week", PrepareConfig(split=[0.8, 0.3, 0.1]), root=REPO)
    with pytest.raises(ConfigError, match="prepare.t_in"):
        prepare_dataset("metr-la-week", PrepareConfig(t_in=0), root=REPO)
    with pytest.raises(ConfigError, match="data_source"):
        prepare_dataset("metr-la-week", PrepareConfig(data_source="ftp"), root=REPO)


def test_offline_auto_names_the_files(tmp_path):
    with pytest.raises(DataError, match="metr-la.h5"):
        prepare_dataset("metr-la", PrepareConfig(data_source="local"), root=tmp_path)


def test_a_city_entry_change_makes_its_processed_folder_stale(tmp_path, monkeypatch):
    """The reading options of a user city (null value, series options, ...) decide its arrays: a processed
    folder written with other ones is stale, and the city is read from raw again (no stale arrays reused)."""
    _write_city(tmp_path / "raw")
    entry = {"directory": str(tmp_path / "raw"), "series": "series.csv", "graph": "adj.csv", "graph_format": "dense",
             "locations": "locations.csv", "units": "km/h", "null_value": 0.0}
    settings = PrepareConfig(processed_dir=str(tmp_path / "processed"))
    write_processed("toy", settings, root=tmp_path, cities={"toy": entry})
    calls = _spy_process(monkeypatch)
    prepare_dataset("toy", settings, root=tmp_path, cities={"toy": entry})
    assert calls == []  # current: read from the processed folder
    first_reading = float(pd.read_csv(tmp_path / "raw" / "series.csv", index_col=0).iloc[0, 0])
    changed = prepare_dataset("toy", settings, root=tmp_path, cities={"toy": {**entry, "null_value": first_reading}})
    assert calls == [1]  # stale: the new null value is applied to the raw readings
    assert bool(torch.isnan(changed.target[0, 0]))


# ----------------------------------------------------------------------------- count cities: real zeros, null values
def _prepare_cli(params: Path, *extra):
    return CliRunner().invoke(cli, ["prepare", "--city", "toy", "--params", str(params), *extra])


def _prepare_noting(params: Path, *extra):
    """`graphtune prepare` that succeeds with notices: (the CLI result, the notices' messages)."""
    with pytest.warns(DataNotice) as record:
        result = _prepare_cli(params, *extra)
    assert result.exit_code == 0, result.output
    return result, _notices(record)


def _zero_columns(df: pd.DataFrame, folder: Path, columns: list[str]) -> pd.DataFrame:
    """Set whole sensors to 0 (a share of the readings known by hand: one of 4 columns = 25%)."""
    df = df.copy()
    df[columns] = 0.0
    df.to_csv(folder / "series.csv")
    return df


def test_null_value_null_keeps_every_zero_as_a_reading(tmp_path):
    df = _zero_columns(_write_city(tmp_path / "raw"), tmp_path / "raw", ["s0", "s1", "s2"])  # 75% zeros
    params = _params(tmp_path, tmp_path / "raw", null_value=None, units="vehicles/hour")
    result = _prepare_cli(params)
    assert result.exit_code == 0, result.output
    out = tmp_path / "processed" / "toy"
    assert result.output.strip() == (f"prepared toy -> {out}: 300 steps x 4 nodes, 15 min, 0% of readings missing, "
                                     f"3 edges, 0 isolated nodes, 1 connected component")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["null_value"] is None and meta["missing_share"] == 0.0
    city = yaml.safe_load(params.read_text())["cities"]
    bundle = prepare_dataset("toy", PrepareConfig(processed_dir=str(tmp_path / "processed")), root=tmp_path,
                             cities=city)
    assert bundle.null_value is None
    np.testing.assert_array_equal(bundle.target.numpy(), df.to_numpy(np.float32))  # every 0 is a reading
    assert bundle.scaler.mean == pytest.approx(df.to_numpy()[:210].mean(), rel=1e-6)  # zeros count in the scaler


def test_null_value_null_with_nan_as_missing_treats_only_nan_as_missing(tmp_path):
    df = _zero_columns(_write_city(tmp_path / "raw"), tmp_path / "raw", ["s0"])
    df.iloc[:30, 1] = np.nan  # 30 of 1200 readings
    df.to_csv(tmp_path / "raw" / "series.csv")
    entry = {"directory": "raw", "series": "series.csv", "graph": "adj.csv", "graph_format": "dense",
             "locations": "locations.csv", "null_value": None, "nan_as_missing": True}
    bundle = prepare_dataset("toy", root=tmp_path, cities={"toy": entry}, use_processed=False)
    assert bundle.meta["missing_share"] == 0.025 and bundle.null_value is None
    assert int(torch.isnan(bundle.target).sum()) == 30 and bool((bundle.target[:, 0] == 0).all())
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw", null_value=None))  # NaN, nan_as_missing unset
    assert msg == (f"graphtune: error: {tmp_path / 'raw' / 'series.csv'}: contains 30 NaN values; if they mark "
                   f"missing readings, set nan_as_missing: true for city toy")


def test_an_unstated_null_value_that_hides_most_readings_is_refused(tmp_path):
    df = _write_city(tmp_path / "raw")
    _zero_columns(df, tmp_path / "raw", ["s0", "s1"])  # 50% zeros
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"))
    assert msg == ("graphtune: error: city toy: 50% of readings equal the null value 0 and would be treated as "
                   "missing; if zeros are real readings set null_value: null, or set null_value: 0 explicitly to "
                   "confirm")
    # Stating the null value, even the default 0, confirms it: the zeros are then missing readings.
    result = _prepare_cli(_params(tmp_path, tmp_path / "raw", null_value=0))
    assert result.exit_code == 0, result.output
    assert "50% of readings missing" in result.output
    meta = json.loads((tmp_path / "processed" / "toy" / "meta.json").read_text())
    assert meta["null_value"] == 0 and meta["missing_share"] == 0.5
    # Below the threshold (25% <= 30%) an unstated 0 stays the missing marker, as in the DCRNN data.
    _zero_columns(df, tmp_path / "raw", ["s0"])
    result = _prepare_cli(_params(tmp_path, tmp_path / "raw"))
    assert result.exit_code == 0 and "25% of readings missing" in result.output, result.output
    assert prep.MISSING_CONFIRM_SHARE == 0.30


def test_a_sub_city_takes_its_parents_stated_null_value(tmp_path):
    spec = get_city("east-copy", {"east-copy": {"subset": {"parent": "montevideo-bus", "side": "east"}}})
    assert spec.null_value is None and spec.null_value_stated and spec.units == "boardings/hour"
    assert spec.graph_format == "links" and spec.interval_minutes == 60


# ----------------------------------------------------------------------------- graphs: isolated nodes, no locations
def _edge_city(tmp_path: Path, graph_format: str = "edges") -> Path:
    """Five sensors on a chain s0 -> s1 -> s2 -> s3 -> s4 whose last link is long: lengths 1, 1, 1, 100.

    DCRNN's kernel: std of {1, 1, 1, 100} = 42.87, so the long link weighs exp(-(100 / 42.87)^2) = 0.004 < 0.1
    and s4 is left without an edge; the short ones weigh exp(-(1 / 42.87)^2) = 0.9995.
    """
    _write_city(tmp_path / "raw", n=5)
    (tmp_path / "raw" / "links.csv").write_text("from,to,cost\ns0,s1,1\ns1,s2,1\ns2,s3,1\ns3,s4,100\n")
    return _params(tmp_path, tmp_path / "raw", graph="links.csv", graph_format=graph_format)


def test_a_kernel_that_isolates_nodes_is_reported_with_the_option_to_change(tmp_path):
    params = _edge_city(tmp_path)
    result, notices = _prepare_noting(params)
    assert notices == [
        "city toy: 1 of 5 nodes (20%) have no edge after the kernel threshold prepare.normalized_k=0.1; lower it "
        "(e.g. 0.01) or give a 0/1 graph with graph_format: links (every listed link weighs 1)"]
    out = tmp_path / "processed" / "toy"
    assert result.output.strip().endswith("3 edges, 1 isolated nodes, 2 connected components")
    assert json.loads((out / "meta.json").read_text())["graph"] == {"edges": 3, "isolated": 1, "components": 2}
    # Either fix named in the notice keeps the link: a lower threshold, or 0/1 links.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataNotice)
        assert _prepare_cli(params, "--set", "prepare.normalized_k=0.001").exit_code == 0
        assert json.loads((out / "meta.json").read_text())["graph"] == {"edges": 4, "isolated": 0, "components": 1}
        assert _prepare_cli(_edge_city(tmp_path, "links")).exit_code == 0
    np.testing.assert_array_equal(np.load(out / "adj.npy"), np.eye(5, k=1))


def test_a_graph_file_that_isolates_nodes_is_reported(tmp_path):
    _write_city(tmp_path / "raw", n=5)
    np.savetxt(tmp_path / "raw" / "adj.csv", np.eye(5), delimiter=",")  # self-loops only: every node alone
    with pytest.warns(DataNotice) as record:
        prepare_dataset("toy", root=tmp_path, use_processed=False,
                        cities={"toy": {"directory": "raw", "series": "series.csv", "graph": "adj.csv",
                                        "graph_format": "dense", "locations": "locations.csv"}})
    assert _notices(record) == [
        f"city toy: 5 of 5 nodes (100%) have no edge in {tmp_path / 'raw' / 'adj.csv'}; models see an isolated node "
        f"only through its own readings: check the file, or give one that links them"]


def test_a_city_without_locations_gets_spectral_coordinates(tmp_path):
    _write_city(tmp_path / "raw")  # its graph: the path s0 - s1 - s2 - s3 (weights 0.5) plus self-loops
    params = _params(tmp_path, tmp_path / "raw", locations=None)
    _, notices = _prepare_noting(params)
    assert notices == [
        "city toy: no locations file, so node positions are spectral coordinates of the graph (coords_source: "
        "spectral); give locations (sensor_id, latitude, longitude) for real positions"]
    out = tmp_path / "processed" / "toy"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["coords_source"] == "spectral" and "coords.npy" in meta["arrays"]
    i = np.arange(4)  # a path's random-walk eigenvectors: cos(pi k i / 3), k = 1, 2
    np.testing.assert_allclose(np.load(out / "coords.npy"), np.column_stack([np.cos(np.pi * i / 3),
                                                                            np.cos(2 * np.pi * i / 3)]), atol=1e-12)
    bundle = prepare_dataset("toy", PrepareConfig(processed_dir=str(tmp_path / "processed")), root=tmp_path,
                             cities=yaml.safe_load(params.read_text())["cities"])
    np.testing.assert_array_equal(bundle.coords, np.load(out / "coords.npy"))
    with_locations = prepare_dataset("toy", root=tmp_path, use_processed=False,
                                     cities={"toy": {"directory": "raw", "series": "series.csv", "graph": "adj.csv",
                                                     "graph_format": "dense", "locations": "locations.csv"}})
    assert with_locations.meta["coords_source"] == "locations"


# ----------------------------------------------------------------------------- MAPE floor
def test_mape_floor_reaches_meta_and_bundle_and_defaults_to_one(tmp_path):
    _write_city(tmp_path / "raw")
    entry = {"directory": "raw", "series": "series.csv", "graph": "adj.csv", "graph_format": "dense",
             "locations": "locations.csv"}
    settings = PrepareConfig(processed_dir=str(tmp_path / "processed"))
    default = prepare_dataset("toy", settings, root=tmp_path, cities={"toy": entry})
    assert default.mape_floor == 1.0 and default.meta["mape_floor"] == 1.0
    write_processed("toy", settings, root=tmp_path, cities={"toy": {**entry, "mape_floor": 5}})
    floored = prepare_dataset("toy", settings, root=tmp_path, cities={"toy": {**entry, "mape_floor": 5}})
    assert floored.mape_floor == 5.0 and isinstance(floored.mape_floor, float)
    assert json.loads((tmp_path / "processed" / "toy" / "meta.json").read_text())["mape_floor"] == 5.0
    with pytest.raises(ConfigError, match=r"^cities.toy.mape_floor: expected a finite number >= 0, got -1$"):
        prepare_dataset("toy", settings, root=tmp_path, cities={"toy": {**entry, "mape_floor": -1}})


# ----------------------------------------------------------------------------- windows as durations
def test_windows_given_as_durations_follow_each_citys_interval(tmp_path):
    _write_city(tmp_path / "raw", freq="15min")
    params = _params(tmp_path, tmp_path / "raw")
    result = _prepare_cli(params, "--set", "prepare.t_in=1h", "--set", "prepare.t_out=30min")
    assert result.exit_code == 0, result.output
    city = yaml.safe_load(params.read_text())["cities"]
    bundle = prepare_dataset("toy", PrepareConfig(processed_dir=str(tmp_path / "processed"), t_in="1h",
                                                  t_out="30min"), root=tmp_path, cities=city)
    assert (bundle.t_in, bundle.t_out) == (4, 2)  # 60 / 15 and 30 / 15 steps
    assert (bundle.t_in_minutes, bundle.t_out_minutes) == (60.0, 30.0)
    assert "windows" not in json.loads((tmp_path / "processed" / "toy" / "meta.json").read_text())
    x, y = bundle.batch(bundle.window_starts("train")[:2])
    assert x.shape == (2, 4, 4, 3) and y.shape == (2, 2, 4)
    week = prepare_dataset("metr-la-week", PrepareConfig(t_in="1h", t_out=3), root=REPO, use_processed=False)
    assert (week.t_in, week.t_out) == (12, 3) and week.t_out_minutes == 15.0


def test_a_duration_that_is_not_whole_steps_is_one_line(tmp_path):
    _write_city(tmp_path / "raw", freq="1h")
    msg = _run_bad(tmp_path, _params(tmp_path, tmp_path / "raw"), "--set", "prepare.t_in=90min")
    assert msg == ("graphtune: error: prepare.t_in: '90min' is 1.5 steps of city toy's 60-minute interval, not a "
                   "whole number; give a multiple of 60 min or a number of steps")


@pytest.mark.parametrize("value", ["12", "soon", "-1h", "0min", "", 0, 2.5, True])
def test_bad_window_lengths_name_the_option(value):
    with pytest.raises(ConfigError) as info:
        prepare_dataset("metr-la-week", PrepareConfig(t_out=value), root=REPO)
    assert str(info.value) == (f'prepare.t_out: expected an integer number of steps >= 1 or a duration such as '
                               f'"1h", "90min", "2d", got {value!r}')
