"""Readers for a city's raw files: the sensor series, the sensor graph and the sensor locations.

Each reader returns plain arrays in the file's own sensor order; `align` then puts the graph and the
coordinates into the series' sensor order. Every problem with a file is a DataError whose one-line
message names the file.

Series formats (`read_series`):
    h5     DCRNN-style pandas HDF5 store (metr-la.h5, pems-bay.h5): a DataFrame, index = timestamps,
           columns = sensor ids
    csv    header row of sensor ids; rows = time steps; timestamps in a column or given by start + interval
    npy    a (T, N) or (T, N, C) array; no timestamps, no ids
    npz    the same array under `data`, `x` or as the only array, optionally with `sensor_ids` and
           `timestamps` arrays beside it

Graph formats (`read_graph`):
    pkl     DCRNN pickle [sensor_ids, sensor_id_to_ind, adj_mx]
    dense   an (N, N) weight matrix in a header-less csv or an npy file; no ids
    edges   `from,to,cost` road distances (DCRNN's distances_la_2012.csv / distances_bay_2017.csv)
    links   `from,to` or `from,to,cost` rows read as a 0/1 graph: every listed link weighs 1 and a cost
            column is ignored; for networks whose links are connections whatever their length (the
            consecutive stops of a bus line), where a kernel on the length would drop the long ones
    coords  a locations file; weights from the great-circle distance between every pair of sensors

Both distance formats (edges, coords) use DCRNN's Gaussian kernel (`distances_to_adjacency`), which
reproduces the published adj_mx_bay.pkl bit for bit from distances_bay_2017.csv. The file suffix
never implies `links`: a from,to,cost csv is read as distances unless the city says graph_format: links.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from graphtune.errors import ConfigError, DataError, DataNotice

SERIES_FORMATS = ("h5", "csv", "npy", "npz")
GRAPH_FORMATS = ("pkl", "dense", "edges", "links", "coords")
EARTH_RADIUS_KM = 6371.0  # mean Earth radius; the sphere is within 0.5% of the ellipsoid at any latitude
_PREVIEW = 5  # how many offending ids or values an error message lists


@dataclass
class SeriesData:
    """One city's readings as stored in its file, on a regular time grid."""

    values: np.ndarray  # (T, N) float64; the file's missing markers (0 or NaN) are kept as read
    index: pd.DatetimeIndex  # (T,) timestamps of the rows
    sensor_ids: list[str]  # (N,) column ids as strings
    interval_minutes: float
    path: Path


# ----------------------------------------------------------------------------- series
def read_series(path, *, fmt: str | None = None, key: str | None = None, timestamp_column: str | None = None,
                start=None, interval_minutes: float | None = None, channel: int = 0,
                fill_gaps: bool = False) -> SeriesData:
    """Read a (T, N) series of sensor readings and put it on a regular time grid.

    fmt: one of SERIES_FORMATS; None = from the file suffix.
    key: HDF5 key or npz array name; None = `df` / `data` / `x` or the only one in the file.
    timestamp_column: csv column holding the timestamps; None = the first column if it parses as dates.
    start, interval_minutes: the time grid of a file without timestamps. With timestamps, `start` must
        equal the first one and `interval_minutes` the spacing between them.
    channel: which channel of a (T, N, C) array to keep (0 = the traffic reading in PEMS0x-style files).
    fill_gaps: False (strict) makes timestamps that skip whole steps of the grid an error; True
        inserts NaN rows for the skipped steps, with a warning, so that every window still spans a
        fixed time. The full pems-bay.h5 has 52116 rows for 181 days (52128 steps): it skips one hour,
        presumably the daylight-saving change, and needs True.
    """
    path = Path(path)
    _check_file(path)
    fmt = fmt or _series_format(path)
    if fmt == "h5":
        data, index, ids = _read_h5(path, key)
    elif fmt == "csv":
        data, index, ids = _read_csv(path, timestamp_column)
    elif fmt in ("npy", "npz"):
        data, index, ids = _read_numpy(path, fmt, key)
    else:
        raise DataError(f"{path}: unknown series format {fmt!r}; expected one of {', '.join(SERIES_FORMATS)}")

    if data.ndim == 3:
        if not 0 <= channel < data.shape[2]:
            raise DataError(f"{path}: channel {channel} requested but the array has {data.shape[2]} channels")
        data = data[:, :, channel]  # (T, N, C) -> (T, N)
    elif data.ndim != 2:
        raise DataError(f"{path}: expected a (time, sensor) or (time, sensor, channel) array, "
                        f"got {data.ndim} dimensions {tuple(data.shape)}")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise DataError(f"{path}: the series is empty (shape {tuple(data.shape)})")
    if np.isinf(data).any():
        row, col = np.argwhere(np.isinf(data))[0]
        raise DataError(f"{path}: infinite value at row {row}, column {col}; "
                        "expected finite readings (NaN or 0 for missing ones)")

    n_steps, n_sensors = data.shape
    ids = [str(i) for i in range(n_sensors)] if ids is None else ids  # files without ids: column numbers
    if len(ids) != n_sensors:
        raise DataError(f"{path}: {len(ids)} sensor ids for {n_sensors} columns")
    _check_unique(path, ids, "sensor ids")

    grid, rows = _time_grid(path, index, n_steps, start, interval_minutes, fill_gaps)
    if rows is not None:
        filled = np.full((len(grid), n_sensors), np.nan)  # (T_grid, N): skipped steps are missing readings
        filled[rows] = data
        data = filled
    step_minutes = (grid[1] - grid[0]).total_seconds() / 60 if len(grid) > 1 else float(interval_minutes)
    return SeriesData(values=np.asarray(data, dtype=np.float64), index=grid, sensor_ids=ids,
                      interval_minutes=step_minutes, path=path)


def _series_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zip") and len(suffixes) > 1:
        suffixes = suffixes[:-1]  # pandas reads compressed csv directly
    formats = {".h5": "h5", ".hdf5": "h5", ".hdf": "h5", ".csv": "csv", ".npy": "npy", ".npz": "npz"}
    if not suffixes or suffixes[-1] not in formats:
        raise DataError(f"{path}: unknown series format (suffix {path.suffix!r}); "
                        f"expected .h5, .hdf5, .csv, .npy or .npz, or give the format")
    return formats[suffixes[-1]]


def _read_h5(path: Path, key: str | None):
    try:
        with pd.HDFStore(path, mode="r") as store:
            keys = [k.lstrip("/") for k in store.keys()]
            if key is None:
                if "df" in keys:  # DCRNN's metr-la.h5 and pems-bay.h5 use key "df"
                    key = "df"
                elif len(keys) == 1:
                    key = keys[0]
                else:
                    raise DataError(f"{path}: holds {len(keys)} tables ({', '.join(keys) or 'none'}); give the key")
            elif key.lstrip("/") not in keys:
                raise DataError(f"{path}: no key {key!r}; the file holds {', '.join(keys) or 'nothing'}")
            frame = store.get(key)
    except DataError:
        raise
    except Exception as exc:  # PyTables/HDF5 raise many types for corrupt or foreign files
        raise DataError(f"cannot read {path} as a pandas HDF5 store: {_one_line(exc)}") from None
    if isinstance(frame, pd.Series):
        frame = frame.to_frame()
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{path}: key {key!r} holds a {type(frame).__name__}, expected a DataFrame")
    _check_numeric_columns(path, frame)
    index = frame.index
    if isinstance(index, pd.DatetimeIndex):
        timestamps = index
    elif pd.api.types.is_numeric_dtype(index.dtype):
        timestamps = None  # a plain row counter: the grid comes from start + interval_minutes
    else:
        timestamps = _parse_timestamps(path, index, "the index")
    ids = [_sensor_id(c) for c in frame.columns]
    return frame.to_numpy(dtype=np.float64), timestamps, ids


def _read_csv(path: Path, timestamp_column: str | None):
    try:
        # The header is read apart as raw strings: pandas would rename duplicated ids ("a", "a.1")
        # and could turn numeric ids into floats.
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
        body = pd.read_csv(path, header=None, skiprows=1)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected a header of sensor ids, then one row per step") from None
    except Exception as exc:
        raise DataError(f"cannot read {path} as csv: {_one_line(exc)}") from None
    header = [h.strip() for h in header]
    if body.shape[1] != len(header):
        raise DataError(f"{path}: the header has {len(header)} columns but the rows have {body.shape[1]}")

    time_col = None
    timestamps = None
    if timestamp_column is not None:
        if timestamp_column not in header:
            raise DataError(f"{path}: no timestamp column {timestamp_column!r}; columns start with "
                            f"{', '.join(header[:_PREVIEW])}")
        time_col = header.index(timestamp_column)
        timestamps = _parse_timestamps(path, body[time_col], f"column {timestamp_column!r}")
    elif len(header) > 1 and not pd.api.types.is_numeric_dtype(body[0].dtype):
        timestamps = _try_parse_timestamps(body[0])  # auto-detect: a first column of dates
        if timestamps is not None:
            time_col = 0

    keep = [c for c in range(len(header)) if c != time_col]
    frame = body[keep]
    frame.columns = [header[c] for c in keep]
    _check_numeric_columns(path, frame)
    return frame.to_numpy(dtype=np.float64), timestamps, [_sensor_id(h) for h in frame.columns]


def _read_numpy(path: Path, fmt: str, key: str | None):
    try:
        loaded = np.load(path, allow_pickle=False)  # never unpickle objects from a data file
    except Exception as exc:
        raise DataError(f"cannot read {path} as {fmt}: {_one_line(exc)}") from None
    if fmt == "npy":
        if not isinstance(loaded, np.ndarray):
            raise DataError(f"{path}: expected a single .npy array, found an npz archive; use fmt='npz'")
        return _numeric_array(path, loaded), None, None
    if isinstance(loaded, np.ndarray):
        raise DataError(f"{path}: expected an npz archive, found a single .npy array; use fmt='npy'")

    with loaded:
        names = list(loaded.files)
        candidates = [n for n in names if n not in ("sensor_ids", "timestamps")]
        if key is not None:
            if key not in names:
                raise DataError(f"{path}: no array {key!r}; the archive holds {', '.join(names)}")
        elif "data" in names:
            key = "data"
        elif "x" in names:
            key = "x"
        elif len(candidates) == 1:
            key = candidates[0]
        else:
            raise DataError(f"{path}: cannot tell which array is the series among {', '.join(names) or 'none'}; "
                            "give the key")
        try:
            data = loaded[key]
            ids = loaded["sensor_ids"] if "sensor_ids" in names else None
            stamps = loaded["timestamps"] if "timestamps" in names else None
        except Exception as exc:
            raise DataError(f"cannot read {path} as npz: {_one_line(exc)}") from None

    data = _numeric_array(path, data)
    if ids is not None:
        ids = [_sensor_id(i) for i in np.ravel(ids)]
    timestamps = None
    if stamps is not None:
        if stamps.ndim != 1 or (data.ndim >= 1 and len(stamps) != data.shape[0]):
            raise DataError(f"{path}: 'timestamps' has shape {stamps.shape}, expected ({data.shape[0]},)")
        if stamps.dtype.kind not in "MUSO":
            raise DataError(f"{path}: 'timestamps' must hold datetime64 values or date strings, "
                            f"got dtype {stamps.dtype}")
        timestamps = _parse_timestamps(path, stamps, "the 'timestamps' array")
    return data, timestamps, ids


def _numeric_array(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise DataError(f"{path}: values have dtype {array.dtype}; expected numbers")
    return array


def _check_numeric_columns(path: Path, frame: pd.DataFrame) -> None:
    for position, dtype in enumerate(frame.dtypes):
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
            continue
        column = frame.iloc[:, position]
        bad = column[pd.to_numeric(column, errors="coerce").isna() & column.notna()]
        example = f" (e.g. {bad.iloc[0]!r})" if len(bad) else ""
        raise DataError(f"{path}: column {frame.columns[position]!r} holds non-numeric values{example}")


def _try_parse_timestamps(values) -> pd.DatetimeIndex | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas warns when it falls back to per-element parsing
        try:
            parsed = pd.DatetimeIndex(pd.to_datetime(values))
        except (ValueError, TypeError, OverflowError):
            return None
    return None if parsed.isna().any() else parsed


def _parse_timestamps(path: Path, values, what: str) -> pd.DatetimeIndex:
    parsed = _try_parse_timestamps(values)
    if parsed is None:
        raise DataError(f"{path}: {what} does not hold valid timestamps everywhere")
    return parsed


def _time_grid(path: Path, index: pd.DatetimeIndex | None, n_steps: int, start, interval_minutes,
               fill_gaps: bool) -> tuple[pd.DatetimeIndex, np.ndarray | None]:
    """The regular time grid of the series and, when steps were skipped, the grid row of each file row."""
    step = None
    if interval_minutes is not None:
        if not interval_minutes > 0:
            raise ConfigError(f"interval_minutes: expected a positive number of minutes, got {interval_minutes!r}")
        step = pd.Timedelta(minutes=interval_minutes)
    if index is None:
        if start is None or step is None:
            raise DataError(f"{path}: the file has no timestamps; give start and interval_minutes")
        return pd.date_range(pd.Timestamp(start), periods=n_steps, freq=step), None

    if start is not None and pd.Timestamp(start) != index[0]:
        raise DataError(f"{path}: the first timestamp is {index[0]} but start={start} was given")
    if n_steps == 1:
        if step is None:
            raise DataError(f"cannot infer the sampling interval of {path}: it has one time step; "
                            "give interval_minutes")
        return index, None
    diffs = index[1:] - index[:-1]  # (T - 1,) Timedelta
    if (diffs <= pd.Timedelta(0)).any():
        at = int(np.argmax(diffs <= pd.Timedelta(0)))
        raise DataError(f"{path}: timestamps are not strictly increasing (row {at + 1}: {index[at]} "
                        f"then {index[at + 1]})")
    usual = pd.Series(diffs).mode().min()  # the most common spacing; gaps are rare, extra steps rarer
    if step is not None and step != usual:
        raise DataError(f"{path}: timestamps are {usual.total_seconds() / 60:g} minutes apart but "
                        f"interval_minutes={interval_minutes:g} was given")
    step = usual
    off_grid = (diffs % step) != pd.Timedelta(0)
    if off_grid.any():
        at = int(np.argmax(off_grid))
        raise DataError(f"cannot infer the sampling interval of {path}: timestamps are irregular "
                        f"(e.g. {index[at]} -> {index[at + 1]} on a {step.total_seconds() / 60:g}-minute grid); "
                        "give a file on a regular grid")
    skipped = np.asarray(diffs // step, dtype=np.int64) - 1  # (T - 1,) grid steps missing after each row
    if not skipped.any():
        return index, None
    first = int(np.argmax(skipped > 0))
    where = (f"timestamps skip {int(skipped.sum())} steps of the {step.total_seconds() / 60:g}-minute interval "
             f"in {int((skipped > 0).sum())} gap(s), the first after {index[first]}")
    if not fill_gaps:
        raise DataError(f"{path}: {where}; pass fill_gaps=True to insert them as missing readings")
    warnings.warn(f"{path}: {where}; inserted as missing (NaN) readings", DataNotice, stacklevel=3)
    grid = pd.date_range(index[0], index[-1], freq=step)
    rows = np.asarray((index - index[0]) // step, dtype=np.int64)  # (T,) grid row of each file row
    return grid, rows


# ----------------------------------------------------------------------------- graphs
def read_graph(path, *, fmt: str | None = None, sensor_ids=None,
               normalized_k: float = 0.1) -> tuple[np.ndarray, list[str] | None]:
    """Read a sensor graph as an (N, N) float32 weight matrix, row = from, column = to.

    Returns (adj, ids): ids in the matrix order, or None for a dense matrix (which has no ids).
    fmt: one of GRAPH_FORMATS; None = `graph_format_of(path)`.
    sensor_ids: for edges, links and coords, the sensors to build the matrix over, in this order (DCRNN's
        gen_adj_mx convention: rows naming other sensors are ignored); for dense, the
        number of sensors it must have; a pickle keeps its own ids (`align` checks them).
    normalized_k: kernel weights below it become 0 (0.1 is DCRNN's value for METR-LA and PEMS-BAY);
        edges and coords only.
    """
    path = Path(path)
    _check_file(path)
    _check_normalized_k(normalized_k)
    fmt = fmt or graph_format_of(path)
    wanted = None if sensor_ids is None else [_sensor_id(s) for s in sensor_ids]
    if fmt == "pkl":
        ids, adj = _read_pickle_graph(path)
    elif fmt == "dense":
        ids, adj = None, _read_dense(path)
    elif fmt == "edges":
        ids, dist = _read_edges(path, wanted)
        adj = _kernel(path, dist, normalized_k)
    elif fmt == "links":
        ids, dist = _read_edges(path, wanted, links=True)
        adj = np.isfinite(dist).astype(np.float32)  # (N, N): 1 for every listed link, 0 elsewhere
    elif fmt == "coords":
        locations = read_locations(path)
        if wanted is not None:
            known = set(locations["sensor_id"])
            missing = [s for s in wanted if s not in known]
            if missing:
                raise DataError(f"{path}: no coordinates for {len(missing)} of {len(wanted)} sensors "
                                f"({_preview(missing)})")
            locations = locations.set_index("sensor_id").loc[wanted].reset_index()
        ids = locations["sensor_id"].tolist()
        dist = haversine_km(locations["latitude"].to_numpy(), locations["longitude"].to_numpy())
        adj = _kernel(path, dist, normalized_k)
    else:
        raise DataError(f"{path}: unknown graph format {fmt!r}; expected one of {', '.join(GRAPH_FORMATS)}")

    _check_adjacency(path, adj)
    if ids is not None:
        if len(ids) != adj.shape[0]:
            raise DataError(f"{path}: {len(ids)} sensor ids for a {adj.shape[0]} x {adj.shape[0]} matrix")
        _check_unique(path, ids, "sensor ids")
    if fmt == "dense" and wanted is not None and adj.shape[0] != len(wanted):
        raise DataError(f"{path}: the matrix has {adj.shape[0]} nodes but the series has {len(wanted)} sensors")
    return adj.astype(np.float32, copy=False), ids


def graph_format_of(path) -> str:
    """The graph format of a file that names none: pkl, dense, edges or coords, from its suffix and content."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return "pkl"
    if suffix == ".npy":
        return "dense"
    if suffix != ".csv":
        raise DataError(f"{path}: unknown graph format (suffix {path.suffix!r}); expected .pkl, .npy or .csv, "
                        "or give the format")
    # A csv is a square matrix, a from,to,cost list or a locations file; tell them apart by the
    # header when there is one, else by the shape and the values.
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"cannot read {path} as csv: {_one_line(exc)}") from None
    first = [c.strip().lower() for c in raw.iloc[0]] if len(raw) else []
    if {"latitude", "longitude"} <= set(first) or {"lat", "lon"} <= set(first):
        return "coords"
    if "from" in first and "to" in first:
        return "edges"
    n_rows, n_cols = raw.shape
    if n_cols == n_rows and n_cols != 3:
        return "dense"
    if n_cols == 3 and n_rows != 3:
        lat = pd.to_numeric(raw[1], errors="coerce")
        lon = pd.to_numeric(raw[2], errors="coerce")
        looks_like_coords = (raw[0].is_unique and lat.between(-90, 90).all() and lon.between(-180, 180).all()
                             and (lat % 1 != 0).any())
        return "coords" if looks_like_coords else "edges"
    if n_cols == 4 and _is_float(first[-1]):
        return "coords"  # index,sensor_id,latitude,longitude without its header
    raise DataError(f"{path}: cannot tell whether this csv is a dense matrix, an edge list or locations "
                    f"({n_rows} rows x {n_cols} columns); give the graph format")


# DCRNN's pickles hold a list, a dict and a numpy array; anything else would run foreign code on load.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode array bytes with it (pure, safe)
}


class _GraphUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a graph pickle only holds "
                                         "lists, dicts and numpy arrays")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy >= 2 moved numpy.core
        return super().find_class(module, name)


def _read_pickle_graph(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        with open(path, "rb") as f:
            content = _GraphUnpickler(f, encoding="latin1").load()  # latin1: DCRNN pickled with Python 2
    except Exception as exc:
        raise DataError(f"cannot read {path} as a graph pickle: {_one_line(exc)}") from None
    if not (isinstance(content, (list, tuple)) and len(content) == 3 and isinstance(content[2], np.ndarray)):
        raise DataError(f"{path}: expected DCRNN's pickle [sensor_ids, sensor_id_to_ind, adj_mx]")
    raw_ids, id_to_ind, adj = content
    ids = [_sensor_id(s) for s in raw_ids]
    if isinstance(id_to_ind, dict) and any(id_to_ind.get(s, i) != i for i, s in enumerate(raw_ids)):
        raise DataError(f"{path}: sensor_id_to_ind disagrees with the order of sensor_ids")
    return ids, _numeric_array(path, adj)


def _read_dense(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            adj = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"cannot read {path} as npy: {_one_line(exc)}") from None
        if not isinstance(adj, np.ndarray):
            raise DataError(f"{path}: expected a single .npy matrix")
        return _numeric_array(path, adj)
    try:
        frame = pd.read_csv(path, header=None)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected an N x N matrix") from None
    except Exception as exc:
        raise DataError(f"cannot read {path} as csv: {_one_line(exc)}") from None
    _check_numeric_columns(path, frame)
    return frame.to_numpy(dtype=np.float64)


def _read_edges(path: Path, sensor_ids: list[str] | None, links: bool = False) -> tuple[list[str], np.ndarray]:
    """(ids, (N, N) float32 distances, inf = no link) from from,to,cost rows.

    links=True: the rows are links, not distances: a cost column is optional and ignored (every link
    gets distance 0, so a caller only reads which entries are finite).
    """
    layout = "from,to[,cost]" if links else "from,to,cost"
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected {layout} rows") from None
    except Exception as exc:
        raise DataError(f"cannot read {path} as csv: {_one_line(exc)}") from None
    if raw.shape[1] not in ((2, 3) if links else (3,)):
        raise DataError(f"{path}: expected {'2 or 3' if links else '3'} columns {layout}, got {raw.shape[1]}")
    header = [c.strip().lower() for c in raw.iloc[0, :2]] == ["from", "to"] if len(raw) else False
    if header or (raw.shape[1] == 3 and len(raw) and not _is_float(raw.iloc[0, 2])):
        raw = raw.iloc[1:]  # a header row such as from,to,cost
    if len(raw) == 0:
        raise DataError(f"{path}: no edges; expected {layout} rows")
    src = [_sensor_id(s) for s in raw[0]]
    dst = [_sensor_id(s) for s in raw[1]]
    if links:
        cost = np.zeros(len(raw))
    else:
        cost = pd.to_numeric(raw[2].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(cost) | (cost < 0)
        if bad.any():
            at = int(np.argmax(bad))
            raise DataError(f"{path}: cost {raw.iloc[at, 2]!r} on the edge {src[at]} -> {dst[at]}; "
                            "expected a finite distance >= 0")

    if sensor_ids is None:
        ids = list(dict.fromkeys(s for pair in zip(src, dst) for s in pair))  # order of first appearance
    else:
        ids = list(sensor_ids)
        seen = set(src) | set(dst)
        unseen = [s for s in ids if s not in seen]
        if unseen:
            what = "link" if links else "distance"
            warnings.warn(f"{path}: {len(unseen)} of {len(ids)} sensors have no {what} at all ({_preview(unseen)}); "
                          "they are isolated in the graph", DataNotice, stacklevel=3)
    position = pd.Index(ids)
    rows = position.get_indexer(src)
    cols = position.get_indexer(dst)
    known = (rows >= 0) & (cols >= 0)
    dist = np.full((len(ids), len(ids)), np.inf, dtype=np.float32)  # (N, N); inf = no road link
    dist[rows[known], cols[known]] = cost[known]  # a repeated pair keeps its last cost, as DCRNN's loop did
    return ids, dist


def _kernel(path: Path, dist: np.ndarray, normalized_k: float) -> np.ndarray:
    try:
        return distances_to_adjacency(dist, normalized_k)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


def distances_to_adjacency(dist: np.ndarray, normalized_k: float = 0.1) -> np.ndarray:
    """DCRNN's thresholded Gaussian kernel: w_ij = exp(-(d_ij / std)^2), zeroed below normalized_k.

    dist: (N, N) distances, inf where two sensors are not linked. std is taken over the finite ones.
    Returns (N, N) float32. Distances, std and their ratio stay in float32 as in DCRNN's gen_adj_mx,
    and the exponential is evaluated in float64 then rounded: that reproduces the published
    adj_mx_bay.pkl exactly (numpy's own float32 exp is off by one unit in the last place for ~1/3 of
    the entries).
    """
    _check_normalized_k(normalized_k)
    dist = np.asarray(dist, dtype=np.float32)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise DataError(f"the distance matrix must be square, got shape {dist.shape}")
    if np.isnan(dist).any() or (dist < 0).any():
        raise DataError("distances must be >= 0 (inf for no link), found NaN or negative values")
    finite = dist[np.isfinite(dist)]
    if finite.size == 0:
        raise DataError("no finite distance between any two sensors")
    std = np.float32(finite.astype(np.float64).std())
    if std == 0:
        raise DataError("all distances are equal, so the kernel width (their std) is 0")
    ratio_sq = np.square(dist / std)  # (N, N) float32
    adj = np.exp(-ratio_sq.astype(np.float64)).astype(np.float32)
    adj[adj < normalized_k] = 0.0
    return adj


def haversine_km(lat, lon) -> np.ndarray:
    """(N, N) great-circle distances in km between all pairs of points given in degrees."""
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    lam = np.radians(np.asarray(lon, dtype=np.float64))
    dphi = phi[:, None] - phi[None, :]  # (N, N)
    dlam = lam[:, None] - lam[None, :]  # (N, N)
    a = np.sin(dphi / 2) ** 2 + np.cos(phi)[:, None] * np.cos(phi)[None, :] * np.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def coordinates_to_adjacency(lat, lon, normalized_k: float = 0.1) -> np.ndarray:
    """Graph from coordinates alone: DCRNN's kernel on the haversine distance of every pair. (N, N) float32."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.shape != lon.shape or lat.ndim != 1:
        raise DataError(f"latitude and longitude must be two vectors of one length, got {lat.shape} and {lon.shape}")
    if np.isnan(lat).any() or np.isnan(lon).any():
        raise DataError("coordinates contain NaN; every sensor needs a latitude and a longitude")
    return distances_to_adjacency(haversine_km(lat, lon), normalized_k)


def _check_adjacency(path: Path, adj: np.ndarray) -> None:
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise DataError(f"{path}: the adjacency must be a square matrix, got shape {adj.shape}")
    if adj.shape[0] == 0:
        raise DataError(f"{path}: the adjacency is empty")
    if not np.isfinite(adj).all():
        raise DataError(f"{path}: the adjacency contains NaN or infinite weights")
    if (adj < 0).any():
        row, col = np.argwhere(adj < 0)[0]
        raise DataError(f"{path}: negative weight {adj[row, col]:g} at ({row}, {col}); weights must be >= 0")


def _check_normalized_k(normalized_k: float) -> None:
    if not 0 <= normalized_k <= 1:
        raise ConfigError(f"normalized_k: expected a kernel threshold in [0, 1], got {normalized_k!r}")


# ----------------------------------------------------------------------------- locations and alignment
def read_locations(path) -> pd.DataFrame:
    """Sensor coordinates as columns sensor_id (str), latitude, longitude (float), in file order.

    Accepts METR-LA's `index,sensor_id,latitude,longitude` with a header and PEMS-BAY's
    `sensor_id,latitude,longitude` without one.
    """
    path = Path(path)
    _check_file(path)
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)  # str: ids stay "773869"
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected sensor_id,latitude,longitude rows") from None
    except Exception as exc:
        raise DataError(f"cannot read {path} as csv: {_one_line(exc)}") from None
    raw = raw.apply(lambda column: column.str.strip())
    if _is_float(raw.iloc[0, -1]):
        if raw.shape[1] == 3:
            columns = {"sensor_id": 0, "latitude": 1, "longitude": 2}
        elif raw.shape[1] == 4:
            columns = {"sensor_id": 1, "latitude": 2, "longitude": 3}  # METR-LA's layout without its header
        else:
            raise DataError(f"{path}: expected columns sensor_id,latitude,longitude, got {raw.shape[1]} columns")
    else:
        names = [h.lower() for h in raw.iloc[0]]
        raw = raw.iloc[1:]
        aliases = {"sensor_id": ("sensor_id", "id", "sensor"), "latitude": ("latitude", "lat"),
                   "longitude": ("longitude", "lon", "lng")}
        columns = {}
        for wanted, options in aliases.items():
            found = [names.index(o) for o in options if o in names]
            if not found:
                raise DataError(f"{path}: no {wanted} column in the header {','.join(names)}")
            columns[wanted] = found[0]
    if len(raw) == 0:
        raise DataError(f"{path}: no sensor rows")

    ids = [_sensor_id(s) for s in raw[columns["sensor_id"]]]
    coords = {}
    for name, limit in (("latitude", 90), ("longitude", 180)):
        text = raw[columns[name]]
        value = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(value) | (np.abs(value) > limit)
        if bad.any():
            at = int(np.argmax(bad))
            raise DataError(f"{path}: {name} {text.iloc[at]!r} of sensor {ids[at]}; expected a number "
                            f"in [-{limit}, {limit}]")
        coords[name] = value
    _check_unique(path, ids, "sensor ids")
    return pd.DataFrame({"sensor_id": ids, "latitude": coords["latitude"], "longitude": coords["longitude"]})


def align(series: SeriesData, adj: np.ndarray, graph_ids, locations: pd.DataFrame | None, *,
          files: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Put the graph and the coordinates into the series' sensor order.

    graph_ids: the ids of adj's rows, or None when the matrix has none (then it must have N rows and is
        taken to be in the series' order). They must be exactly the series' ids.
    locations: from `read_locations`, or None. Sensors it lacks get NaN coordinates and a warning.
    files: file names by role ("series", "graph", "locations") for the messages.
    Returns (adj (N, N) float32 in series order, coords (N, 2) latitude/longitude in series order or None).
    """
    series_file = files.get("series", series.path)
    graph_file = files.get("graph", "the graph")
    ids = series.sensor_ids
    adj = np.asarray(adj)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise DataError(f"{graph_file}: the adjacency must be a square matrix, got shape {adj.shape}")
    if graph_ids is None:
        if adj.shape[0] != len(ids):
            raise DataError(f"{graph_file} has {adj.shape[0]} nodes but {series_file} has {len(ids)} sensors")
        ordered = adj
    else:
        graph_ids = [_sensor_id(s) for s in graph_ids]
        if len(graph_ids) != adj.shape[0]:
            raise DataError(f"{graph_file}: {len(graph_ids)} sensor ids for a {adj.shape[0]}-node matrix")
        _check_unique(graph_file, graph_ids, "sensor ids")
        in_graph = set(graph_ids)
        in_series = set(ids)
        missing = [s for s in ids if s not in in_graph]
        extra = [s for s in graph_ids if s not in in_series]
        if missing or extra:
            raise DataError(f"sensor ids of {graph_file} and {series_file} disagree: {len(missing)} series sensors "
                            f"are not in the graph ({_preview(missing)}), {len(extra)} graph sensors are not in "
                            f"the series ({_preview(extra)})")
        order = pd.Index(graph_ids).get_indexer(ids)  # (N,) graph row of each series sensor
        ordered = adj[np.ix_(order, order)]

    coords = None
    if locations is not None:
        table = locations.set_index("sensor_id")[["latitude", "longitude"]]
        coords = table.reindex(ids).to_numpy(dtype=np.float64)  # (N, 2); NaN rows for unknown sensors
        missing = [s for s, row in zip(ids, coords) if np.isnan(row).any()]
        if missing:
            warnings.warn(f"{files.get('locations', 'the locations file')}: no coordinates for {len(missing)} of "
                          f"{len(ids)} sensors of {series_file} ({_preview(missing)}); their coordinates are NaN",
                          DataNotice, stacklevel=2)
    return ordered.astype(np.float32, copy=False), coords


# ----------------------------------------------------------------------------- small helpers
def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")


def _check_unique(path, ids: list[str], what: str) -> None:
    if len(set(ids)) != len(ids):
        dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique().tolist()
        raise DataError(f"{path}: duplicated {what} ({_preview(dup)})")


def _sensor_id(value) -> str:
    """Ids as strings; integral floats lose their '.0' so 773869.0 and '773869' name the same sensor."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value).strip()


def _is_float(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _preview(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:_PREVIEW])
    return shown + (", ..." if len(items) > _PREVIEW else "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
