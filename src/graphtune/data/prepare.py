"""Raw city files -> the dataset bundle, and the `prepare` stage's on-disk contract.

`prepare_dataset(city)` returns a DatasetBundle. It reads `data/processed/<city>/` when that
folder is there and current (same source-file hashes, same preparation options), and the raw
files otherwise. `write_processed(city)` is the DVC `prepare` stage: it writes

    data/processed/<city>/series.npy   (T, N) float32, raw units, NaN = missing
    data/processed/<city>/time.npy     (T, 2) float32, time of day in [0, 1), day of week 0..6
    data/processed/<city>/adj.npy      (N, N) float32
    data/processed/<city>/coords.npy   (N, 2) float64 latitude, longitude; without a locations file,
                                       spectral coordinates of the graph (meta "coords_source")
    data/processed/<city>/meta.json    shape, interval, split boundaries, null value, missing share, MAPE
                                       floor, graph facts, scaler, sources, and the sha256 of each array
                                       file above ("arrays")

byte-identical when rerun on the same input (npy has no timestamps; JSON keys are sorted).
The folder is written next to its final place and swapped into it only when complete (see
graphtune.fileio), so a failure never leaves a half-written city behind.

Reading it back verifies every array file against meta.json: a file changed after `prepare`
(overwritten in place, truncated, removed) is reported in one DataNotice, and the city is rebuilt
from its raw files, which rewrites the folder so the next run reads verified arrays again.

Splits are chronological ranges of time steps (70/10/20 by default); the scaler is fit on the
training range only; readings equal to the city's null value are missing (NaN in `series.npy`).

What `prepare` checks and reports about a city (one-line errors and DataNotices, facts in meta.json):
- missing readings: "missing_share". A null value the city entry does not state (the default 0)
  that would hide more than MISSING_CONFIRM_SHARE of the readings is refused: zeros that common are
  more likely real readings (counts) than missing ones, so the entry must say which (null_value: null,
  or null_value: 0 to confirm).
- the graph: "graph" = {edges, isolated, components} (graphtune.data.graph.graph_stats); more than
  ISOLATED_NOTICE_SHARE of the nodes without an edge gets a notice naming the option to change.
- positions: "coords_source" = "locations" (the locations file) or "spectral" (none: coordinates
  derived from the graph, with a notice).
- windows: prepare.t_in / t_out in steps or as a duration, resolved with the city's interval into the
  bundle's t_in / t_out (steps; t_in_minutes / t_out_minutes), not into meta.json, which windows do not change.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from graphtune.data.bundle import DatasetBundle, Scaler
from graphtune.data.cities import CitySpec, get_city, percent
from graphtune.data.fetch import resolve_file, sha256_file
from graphtune.data.graph import graph_stats, spectral_coordinates
from graphtune.data.loaders import (
    align, coordinates_to_adjacency, graph_format_of, read_graph, read_locations, read_series,
)
from graphtune.data.windows import window_steps
from graphtune.config import PrepareConfig, validate_section
from graphtune.errors import ConfigError, DataError, DataNotice, OutputError
from graphtune.fileio import atomic_directory

# Bump when the processed layout or its semantics change: old folders are then stale and read from raw.
# 2: meta.json records the sha256 of every array file ("arrays"), and reading verifies them.
# 3: the options record the city entry's reading options (null value, series options, sub-city, ...).
# 4: meta.json records the graph facts, coords_source and mape_floor; null_value may be null; coords.npy is
#    always written (spectral coordinates without a locations file).
FORMAT_VERSION = 4
ARRAY_FILES = ("adj.npy", "coords.npy", "series.npy", "time.npy")

# An unstated null value (the default 0) hiding more than this share of the readings is refused until the entry
# states one. Missing readings of sensor networks are a few percent (METR-LA 8.1%, PEMS-BAY 0.003%); a share
# far above that means the zeros are data (counts: 80% of Montevideo's hourly boardings are 0), and treating
# them as missing would train and score on the busy hours only, silently.
MISSING_CONFIRM_SHARE = 0.30
# More than this share of nodes without any edge gets a notice: graph models see an isolated node only through
# its own readings, so a graph that leaves many nodes alone is most often a threshold or file problem.
ISOLATED_NOTICE_SHARE = 0.10
PROCESSED_FILES = (*ARRAY_FILES, "meta.json")


@dataclass
class _Arrays:
    """The processed arrays of one city, before they become a bundle or files."""

    series: np.ndarray  # (T, N) float32, NaN = missing
    time: np.ndarray  # (T, 2) float32
    adj: np.ndarray  # (N, N) float32
    coords: np.ndarray  # (N, 2) float64: latitude, longitude, or spectral (meta["coords_source"])
    meta: dict


# ----------------------------------------------------------------------------- public API
def prepare_dataset(city: str, prepare: PrepareConfig | None = None, *, root: str | Path = ".",
                    cities: dict | None = None, use_processed: bool = True) -> DatasetBundle:
    """Load city `city` as a DatasetBundle (from `prepare.processed_dir` when current, else from its raw files).

    `prepare` is the params.yaml `prepare:` section (None = its defaults): processed_dir, data_source
    (local | url | hf | auto), cache_dir, url_overrides, split, normalized_k, t_in, t_out, stride.
    t_in and t_out are steps or durations ("1h"), converted with the city's interval.
    `cities` holds user city entries (params.yaml `cities:`).

    A processed folder whose arrays no longer match its meta.json is rebuilt from the raw files and
    rewritten, with one DataNotice naming the file; where it cannot be rewritten (a read-only checkout,
    foreign files in it) this run uses the rebuilt arrays and the notice says so.
    """
    prepare = _checked(prepare)
    spec, paths, sources, options = _inputs(city, root, cities, prepare)
    out = Path(root, prepare.processed_dir, spec.name)
    arrays, problem = _read_processed(out, sources, options) if use_processed else (None, None)
    if arrays is None:
        arrays = _process(spec, paths, sources, options, cities)
    if problem is not None:
        try:
            arrays.meta = _write_atomic(out, arrays)
            done = f"rebuilt {out} from the raw files"
        except (OSError, OutputError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            done = f"rebuilt it from the raw files for this run only; could not rewrite {out} ({reason})"
        warnings.warn(f"{problem}; {done}", DataNotice, stacklevel=2)
    return _to_bundle(spec.name, arrays, prepare)


def write_processed(city: str, prepare: PrepareConfig | None = None, *, root: str | Path = ".",
                    cities: dict | None = None) -> Path:
    """The `prepare` stage: process city `city` from its raw files and write `prepare.processed_dir/<city>/`.

    Validates that the city yields at least one window per split with (t_in, t_out, stride) before writing.
    """
    prepare = _checked(prepare)
    spec, paths, sources, options = _inputs(city, root, cities, prepare)
    arrays = _process(spec, paths, sources, options, cities)
    _to_bundle(spec.name, arrays, prepare)  # raises if a split is too short for one window
    out = Path(root, prepare.processed_dir, spec.name)
    _write_atomic(out, arrays)
    return out


# ----------------------------------------------------------------------------- steps
def _checked(prepare: PrepareConfig | None) -> PrepareConfig:
    prepare = PrepareConfig() if prepare is None else prepare
    validate_section("prepare", prepare)  # one-line ConfigError naming prepare.<key>
    return prepare


def processing_options(prepare: PrepareConfig, spec: CitySpec) -> dict:
    """What decides the processed arrays besides the raw files' bytes: recorded in meta.json, and a
    processed folder recorded with other options is stale. The city entry's reading options count too
    (null value, NaN handling, series options, interval, graph format, sub-city), so editing them reruns it."""
    city = {"null_value": spec.null_value, "nan_as_missing": spec.nan_as_missing, "units": spec.units,
            "series_options": dict(spec.series_options), "interval_minutes": spec.interval_minutes,
            "graph_format": spec.graph_format, "subset": spec.subset, "mape_floor": spec.mape_floor}
    return {"split": [float(x) for x in prepare.split], "normalized_k": float(prepare.normalized_k),
            "format_version": FORMAT_VERSION, "city": json.loads(json.dumps(city, sort_keys=True, default=str))}


def _inputs(city: str, root, cities, prepare: PrepareConfig):
    """Find the city and its files, hash them: what decides whether outputs are current."""
    spec = get_city(city, cities)
    paths = _resolve_files(spec, Path(root), prepare.data_source, Path(root, prepare.cache_dir),
                           prepare.url_overrides or {})
    sources = {role: sha256_file(p) for role, p in paths.items()}
    return spec, paths, sources, processing_options(prepare, spec)


def _resolve_files(spec: CitySpec, root: Path, data_source: str, cache_dir: Path, overrides: dict) -> dict[str, Path]:
    local_dir = Path(root, spec.directory)
    return {
        role: resolve_file(remote, local_dir=local_dir, data_source=data_source, cache_dir=cache_dir / spec.name,
                           url_override=overrides.get(remote.name))
        for role, remote in spec.files().items()
    }


def _process(spec: CitySpec, paths: dict[str, Path], sources: dict, options: dict,
             cities: dict | None) -> _Arrays:
    """Read, align, validate and convert the raw files. Peak extra memory stays near one float32 copy."""
    opts = dict(spec.series_options)
    if spec.interval_minutes is not None:
        opts.setdefault("interval_minutes", spec.interval_minutes)
    data = read_series(paths["series"], **opts)
    coords_df = read_locations(paths["locations"]) if "locations" in paths else None
    if "graph" in paths:
        graph_format = spec.graph_format or graph_format_of(paths["graph"])
        adj, graph_ids = read_graph(paths["graph"], fmt=graph_format, sensor_ids=data.sensor_ids,
                                    normalized_k=options["normalized_k"])
    else:
        graph_format, adj, graph_ids = None, None, None
    files = {role: str(p) for role, p in paths.items()}
    if adj is None:
        if coords_df is None:
            raise DataError(f"city {spec.name}: no graph file and no locations file to build a graph from")
        _, coords = align(data, np.eye(len(data.sensor_ids), dtype=np.float32), None, coords_df, files=files)
        if np.isnan(coords).any():
            raise DataError(f"{paths['locations']}: every sensor needs coordinates to build the graph from them")
        adj = coordinates_to_adjacency(coords[:, 0], coords[:, 1], normalized_k=options["normalized_k"])
    else:
        adj, coords = align(data, adj, graph_ids, coords_df, files=files)
    values = data.values  # (T, N) float64, as read
    sensor_ids = list(data.sensor_ids)

    if np.isinf(values).any():
        raise DataError(f"{paths['series']}: contains infinite values; expected finite readings")
    n_nan = int(np.isnan(values).sum())
    if n_nan and not spec.nan_as_missing:
        if spec.null_value is None:  # no null value: NaN is the only way to mark a missing reading
            raise DataError(f"{paths['series']}: contains {n_nan} NaN values; if they mark missing readings, set "
                            f"nan_as_missing: true for city {spec.name}")
        raise DataError(
            f"{paths['series']}: contains {n_nan} NaN values; mark missing readings with the null value "
            f"{spec.null_value:g}, or set nan_as_missing: true for city {spec.name}"
        )

    if spec.subset:
        keep = _subset_nodes(spec, coords, paths)
        values, adj, coords = values[:, keep], adj[np.ix_(keep, keep)], coords[keep]
        sensor_ids = [sensor_ids[i] for i in keep]

    series = values.astype(np.float32)  # (T, N): the one full-size copy we make
    if spec.null_value is not None:
        is_null = series == np.float32(spec.null_value)  # (T, N)
        _confirm_null_value(spec, float(is_null.mean()))
        series[is_null] = np.nan  # missing readings
        del is_null
    missing_share = float(np.isnan(series).mean())
    n_steps = series.shape[0]
    bounds = split_bounds(n_steps, options["split"])
    scaler = Scaler.fit(series[: bounds["train"][1]])

    adj = adj.astype(np.float32)
    graph = graph_stats(adj)
    _notice_isolated(spec, graph, adj.shape[0], graph_format, options["normalized_k"], paths)
    coords_source = "locations"
    if coords is None:
        coords, coords_source = spectral_coordinates(adj), "spectral"
        warnings.warn(f"city {spec.name}: no locations file, so node positions are spectral coordinates of the "
                      f"graph (coords_source: spectral); give locations (sensor_id, latitude, longitude) for real "
                      f"positions", DataNotice, stacklevel=3)

    meta = {
        "city": spec.name,
        "format_version": FORMAT_VERSION,
        "shape": list(series.shape),
        "interval_minutes": data.interval_minutes,
        "start": str(data.index[0]),
        "end": str(data.index[-1]),
        "splits": {k: list(v) for k, v in bounds.items()},
        "null_value": spec.null_value,  # None (JSON null): every value is a reading; only NaN can be missing
        "missing_share": round(missing_share, 6),
        "mape_floor": float(spec.mape_floor),
        "scaler": scaler.to_dict(),
        "units": spec.units,
        "sensor_ids": sensor_ids,
        "graph": graph,
        "coords_source": coords_source,
        "sources": {role: {"file": Path(p).name, "sha256": sources[role]} for role, p in paths.items()},
        "options": options,
        "subset": spec.subset,
        "synthetic": False,
    }
    return _Arrays(series=series, time=time_features(data.index), adj=adj, coords=coords, meta=meta)


def _confirm_null_value(spec: CitySpec, null_share: float) -> None:
    """Refuse an unstated null value that would hide more than MISSING_CONFIRM_SHARE of the readings."""
    if spec.null_value_stated or null_share <= MISSING_CONFIRM_SHARE:
        return
    value = f"{spec.null_value:g}"
    raise ConfigError(f"city {spec.name}: {percent(null_share)} of readings equal the null value {value} and would "
                      f"be treated as missing; if zeros are real readings set null_value: null, or set "
                      f"null_value: {value} explicitly to confirm")


def _notice_isolated(spec: CitySpec, graph: dict, n_nodes: int, graph_format: str | None, normalized_k: float,
                     paths: dict) -> None:
    """One DataNotice when more than ISOLATED_NOTICE_SHARE of the nodes have no edge, naming what to change."""
    isolated = graph["isolated"]
    if not n_nodes or isolated / n_nodes <= ISOLATED_NOTICE_SHARE:
        return
    head = f"city {spec.name}: {isolated} of {n_nodes} nodes ({isolated / n_nodes:.0%}) have no edge"
    if graph_format == "edges":
        advice = (f"after the kernel threshold prepare.normalized_k={normalized_k:g}; lower it (e.g. 0.01) or give "
                  f"a 0/1 graph with graph_format: links (every listed link weighs 1)")
    elif graph_format in (None, "coords"):
        advice = (f"after the kernel threshold prepare.normalized_k={normalized_k:g} on their coordinates; "
                  f"lower it (e.g. 0.01) or give a graph file")
    else:
        advice = (f"in {paths['graph']}; models see an isolated node only through its own readings: "
                  f"check the file, or give one that links them")
    warnings.warn(f"{head} {advice}", DataNotice, stacklevel=4)


def time_features(index: pd.DatetimeIndex) -> np.ndarray:
    """(T, 2) float32 from real timestamps: time of day as a fraction of 24 h, day of week (Monday = 0)."""
    minutes = index.hour * 60 + index.minute + index.second / 60.0
    return np.column_stack([np.asarray(minutes / 1440.0), np.asarray(index.day_of_week)]).astype(np.float32)


def split_bounds(n_steps: int, split: tuple[float, float, float]) -> dict[str, tuple[int, int]]:
    """Chronological {train, val, test}: (first step, end step) for `split`'s shares of n_steps."""
    t1 = int(round(n_steps * split[0]))
    t2 = int(round(n_steps * (split[0] + split[1])))
    return {"train": (0, t1), "val": (t1, t2), "test": (t2, n_steps)}


def _subset_nodes(spec: CitySpec, coords: np.ndarray | None, paths: dict) -> np.ndarray:
    """Indices, ascending, of the parent city's sensors that make up the sub-city `spec.subset`.

    {"side": "west" | "east"}: the sensors with longitude below (west) / at or above (east) the parent's median
    longitude. {"regions": K, "region": R}: the sensors of region R (1-based) of `kmeans_regions(coords, K)`:
    k-means (sklearn KMeans, n_clusters=K, n_init=10, random_state=0) on the sensors' positions in km on a local
    equirectangular plane, regions numbered west to east by their centre's x (ties by y).
    `coords` are the parent's (N, 2) latitude, longitude; a sensor without them is a one-line DataError, and so
    is K above the number of sensors (or of distinct positions).
    """
    regions = spec.subset.get("regions")
    columns = [1] if regions is None else [0, 1]  # the median split looks at longitudes only
    if coords is None or np.isnan(coords[:, columns]).any():
        raise DataError(f"city {spec.name}: the geographic split needs coordinates for every sensor "
                        f"({paths.get('locations', 'no locations file')})")
    if regions is None:
        median = float(np.median(coords[:, 1]))
        west = coords[:, 1] < median
        return np.flatnonzero(west if spec.subset["side"] == "west" else ~west)
    n_positions = len(np.unique(coords, axis=0))
    if regions > n_positions:
        parent = spec.subset["parent"]
        what = f"{len(coords)} sensors" if n_positions == len(coords) else f"{n_positions} distinct sensor positions"
        raise DataError(f"city {spec.name}: subset.regions = {regions} is more than the {what} of {parent}; "
                        f"use at most {n_positions} regions")
    return np.flatnonzero(kmeans_regions(coords, regions) == spec.subset["region"])


# km per degree on the local plane of `kmeans_regions`: of longitude at the equator, of latitude (WGS84 mean)
KM_PER_DEGREE_LON = 111.32
KM_PER_DEGREE_LAT = 110.57


def local_plane_km(coords: np.ndarray) -> np.ndarray:
    """(N, 2) float64 positions in km, x east and y north of the sensors' mean position, from (N, 2) latitude,
    longitude: x = (lon - mean lon) * 111.32 * cos(mean lat), y = (lat - mean lat) * 110.57 (equirectangular)."""
    lat, lon = np.asarray(coords[:, 0], dtype=np.float64), np.asarray(coords[:, 1], dtype=np.float64)
    mean_lat, mean_lon = float(lat.mean()), float(lon.mean())
    x = (lon - mean_lon) * KM_PER_DEGREE_LON * np.cos(np.radians(mean_lat))
    y = (lat - mean_lat) * KM_PER_DEGREE_LAT
    return np.column_stack([x, y])


def kmeans_regions(coords: np.ndarray, k: int) -> np.ndarray:
    """(N,) int region of each sensor, 1..k, from (N, 2) latitude, longitude: the sub-cities {"regions": k}.

    KMeans(n_clusters=k, n_init=10, random_state=0) on `local_plane_km(coords)`; clusters are numbered 1..k west
    to east by their centre's x, ties by y. The same coordinates give the same regions on every run.
    """
    from sklearn.cluster import KMeans  # imported here: only region sub-cities need it, and it is slow to import

    points = local_plane_km(coords)
    km = KMeans(n_clusters=k, n_init=10, random_state=0).fit(points)
    centres = km.cluster_centers_
    order = np.lexsort((centres[:, 1], centres[:, 0]))  # cluster labels, west to east
    number = np.empty(k, dtype=np.int64)
    number[order] = np.arange(1, k + 1)
    return number[km.labels_]


def _to_bundle(name: str, a: _Arrays, prepare: PrepareConfig) -> DatasetBundle:
    """The bundle of the processed arrays `a`, with prepare's windows resolved to the city's steps."""
    meta = a.meta
    interval = float(meta["interval_minutes"])
    t_in = window_steps(prepare.t_in, interval, "prepare.t_in", name)
    t_out = window_steps(prepare.t_out, interval, "prepare.t_out", name)
    scaler = Scaler(**meta["scaler"])
    splits = {k: tuple(v) for k, v in meta["splits"].items()}
    for split, (lo, hi) in splits.items():
        if hi - lo < t_in + t_out:
            raise DataError(
                f"city {name}: the {split} part has {hi - lo} steps, fewer than one window of "
                f"t_in + t_out = {t_in + t_out} steps ({meta['shape'][0]} steps in all)"
            )
    target = torch.from_numpy(a.series)  # (T, N) raw, NaN = missing; shares memory with the array
    scaled = np.subtract(a.series, np.float32(scaler.mean), dtype=np.float32)  # (T, N), one allocation
    scaled /= np.float32(scaler.std)
    np.nan_to_num(scaled, nan=0.0, copy=False)  # missing -> 0.0, i.e. the training mean
    values = torch.from_numpy(scaled)
    null_value = meta["null_value"]
    return DatasetBundle(
        name=name,
        values=values,
        target=target,
        time_features=torch.from_numpy(a.time),
        adj=a.adj,
        sensor_ids=list(meta["sensor_ids"]),
        interval_minutes=interval,
        splits=splits,
        scaler=scaler,
        coords=a.coords,
        t_in=t_in,
        t_out=t_out,
        stride=prepare.stride,
        units=meta.get("units", ""),
        null_value=None if null_value is None else float(null_value),
        mape_floor=float(meta["mape_floor"]),
        meta=meta,
    )


# ----------------------------------------------------------------------------- files
def _read_processed(out: Path, sources: dict, options: dict) -> tuple[_Arrays | None, str | None]:
    """Read the processed folder `out` back, verified.

    (arrays, None): complete, current (same sources and options) and every array matches meta.json.
    (None, None): absent or stale (other sources, options or FORMAT_VERSION): expected, read the raw files.
    (None, problem): current but damaged; `problem` is one line naming the file, for the caller's notice.
    """
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None, None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None, None  # without its record the folder cannot be current: read the raw files as before
    if not isinstance(meta, dict):
        return None, None
    current = {role: s.get("sha256") if isinstance(s, dict) else None for role, s in meta.get("sources", {}).items()}
    if current != sources or meta.get("options") != options:
        return None, None
    problem = _verify_arrays(out, meta.get("arrays"))
    if problem is not None:
        return None, problem
    try:
        return _Arrays(series=np.load(out / "series.npy"), time=np.load(out / "time.npy"),
                       adj=np.load(out / "adj.npy"), coords=np.load(out / "coords.npy"), meta=meta), None
    except (OSError, ValueError) as err:  # changed between the hash and the load, or not an npy file
        return None, f"{out}: processed arrays are unreadable ({err})"


def _verify_arrays(out: Path, declared) -> str | None:
    """None when the array files in `out` are exactly those `declared` ({name: sha256}) with those contents,
    else one line naming the first file that differs."""
    if not isinstance(declared, dict):
        return f"{out / 'meta.json'}: records no array hashes"
    for name in sorted(set(ARRAY_FILES) | set(declared)):
        path = out / name
        if not path.is_file():
            return f"{path}: missing (meta.json lists it)" if name in declared else f"{path}: missing"
        if name not in declared:
            return f"{path}: not listed in meta.json's array hashes (meta.json changed after prepare)"
        if sha256_file(path) != declared[name]:
            return f"{path}: contents differ from meta.json (changed after prepare)"
    return None


def _write_atomic(out: Path, a: _Arrays) -> dict:
    """Write the processed folder `out` in one step; returns the meta.json written (with the array hashes).

    The hashes come from the files as written, not from the arrays in memory, so they describe exactly
    the bytes a later read verifies. Older folders (no manifest) hold only PROCESSED_FILES: replaceable.
    """
    with atomic_directory(out, legacy_names=PROCESSED_FILES) as tmp:
        np.save(tmp / "series.npy", a.series)
        np.save(tmp / "time.npy", a.time)
        np.save(tmp / "adj.npy", a.adj)
        np.save(tmp / "coords.npy", a.coords)
        arrays = {name: sha256_file(tmp / name) for name in ARRAY_FILES}
        meta = {**a.meta, "arrays": arrays}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta
