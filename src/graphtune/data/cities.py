"""The city table: one place that describes every city GraphTune knows.

A city names its three files (series, graph, locations), where they live locally, where
they can be fetched from (URL or Hugging Face dataset repo, with sha256 where known), its
sampling interval, units, null value, and a fact block (shape, date range, missing share).
Users add cities without touching code through the `cities:` section of params.yaml
(see `city_from_dict` for the keys).

Registered cities
-----------------
metr-la     Los Angeles highway loop detectors (DCRNN, ICLR 2018). 34272 steps x 207 sensors,
            5 min, 2012-03-01 .. 2012-06-27, speed in mph, about 8% zeros = missing.
pems-bay    Bay Area PeMS sensors (DCRNN). 52116 steps x 325 sensors, 5 min,
            2017-01-01 .. 2017-06-30, speed in mph, about 0.003% zeros.
metr-la-week  Embedded real sample (data/sample/metr-la-week): the first week of METR-LA,
            2016 steps x 207 sensors, 5 min, 2012-03-01 00:00 .. 2012-03-07 23:55, no missing
            values (imputed upstream by the T-GCN authors). MIT (DCRNN, T-GCN).
metr-la-west / metr-la-east  Two real sub-cities of metr-la-week split by geography: sensors
            west (longitude below the median) / east (at or above the median), each with the
            induced subgraph of the DCRNN adjacency: 103 and 104 sensors. A cross-region
            transfer with no download.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from graphtune.data.fetch import RemoteFile
from graphtune.errors import ConfigError

ROLES = ("series", "graph", "locations")
SIDES = ("west", "east")

_DCRNN_RAW = "https://raw.githubusercontent.com/liyaguang/DCRNN/master/data/sensor_graph"
_ZENODO_BAY = "https://zenodo.org/records/4263971/files"


@dataclass(frozen=True)
class CitySpec:
    """How to find, read and describe one city's raw files."""

    name: str
    directory: str  # folder of the raw files, relative to the project root (or absolute)
    series: RemoteFile  # speeds/flows: h5, csv, npy or npz (T x N [x C])
    graph: RemoteFile | None = None  # pkl, dense csv/npy, from,to,cost edges; None = kernel on coordinates
    locations: RemoteFile | None = None  # sensor_id, latitude, longitude
    graph_format: str | None = None  # "pkl" | "dense" | "edges" | "coords"; None = from the file suffix
    series_options: dict = field(default_factory=dict)  # key, timestamp_column, start, interval_minutes
    interval_minutes: float | None = None  # None = inferred from the timestamps
    units: str = ""
    null_value: float = 0.0  # readings equal to it are missing (the DCRNN convention: 0 = no reading)
    nan_as_missing: bool = False  # NaN in the series is an error unless the city says it means "missing"
    facts: dict = field(default_factory=dict)  # shape, date_range, missing_share: the fact block
    subset: dict | None = None  # {"parent": city, "side": "west" | "east"}: a geographic sub-city
    description: str = ""

    def files(self) -> dict[str, RemoteFile]:
        """The city's files by role (series, graph, locations), skipping roles it does not have."""
        return {role: f for role in ROLES if (f := getattr(self, role)) is not None}


REGISTERED: dict[str, CitySpec] = {}


def _register(spec: CitySpec) -> None:
    REGISTERED[spec.name] = spec


_register(CitySpec(
    name="metr-la",
    directory="data/raw/metr-la",
    series=RemoteFile("metr-la.h5", hf_repo="jimmygao3218/METRLA"),
    graph=RemoteFile("adj_mx.pkl", url=f"{_DCRNN_RAW}/adj_mx.pkl", hf_repo="jimmygao3218/METRLA",
                     sha256="a35687c6e15aa228dc45027b0ed2a0ea0f4ec78f573deb992c595092d12f61b3"),
    locations=RemoteFile("graph_sensor_locations.csv", url=f"{_DCRNN_RAW}/graph_sensor_locations.csv",
                         hf_repo="jimmygao3218/METRLA",
                         sha256="eb8ea96e07358b45d0e4ba3b89c2673fa20c54af50150249e627389e749ade6f"),
    series_options={"key": "df"},
    units="mph",
    facts={"shape": [34272, 207], "date_range": ["2012-03-01 00:00", "2012-06-27 23:55"], "interval_minutes": 5,
           "missing_share": 0.081},
    description="Los Angeles County highway loop detectors (DCRNN, ICLR 2018)",
))

_register(CitySpec(
    name="pems-bay",
    directory="data/raw/pems-bay",
    series=RemoteFile("pems-bay.h5", url=f"{_ZENODO_BAY}/pems-bay.h5?download=1"),
    graph=RemoteFile("adj_mx_bay.pkl", url=f"{_ZENODO_BAY}/adj_mx_bay.pkl?download=1",
                     sha256="116275f5704d0d492018e14c047f7ae5004385b450aa907f88424055a4a97370"),
    locations=RemoteFile("graph_sensor_locations_bay.csv", url=f"{_DCRNN_RAW}/graph_sensor_locations_bay.csv",
                         sha256="276ee01059610774d4e59572507f7e32eaac21f1f5882fcd9e3d7d426a4b7a6c"),
    # the full file skips one hour (52116 rows for 181 days x 288): those steps become missing readings
    series_options={"key": "speed", "fill_gaps": True},
    nan_as_missing=True,
    units="mph",
    facts={"shape": [52116, 325], "date_range": ["2017-01-01 00:00", "2017-06-30 23:55"], "interval_minutes": 5,
           "missing_share": 0.00003},
    description="San Francisco Bay Area PeMS sensors (DCRNN, ICLR 2018)",
))

_register(CitySpec(
    name="metr-la-week",
    directory="data/sample/metr-la-week",
    series=RemoteFile("metr-la-week.h5",
                      sha256="6b4e795980953405581d40348dc82f42779ef707d411bc64a3d1d12d319191a6"),
    graph=RemoteFile("adj_mx.pkl", sha256="a35687c6e15aa228dc45027b0ed2a0ea0f4ec78f573deb992c595092d12f61b3"),
    locations=RemoteFile("graph_sensor_locations.csv",
                         sha256="eb8ea96e07358b45d0e4ba3b89c2673fa20c54af50150249e627389e749ade6f"),
    series_options={"key": "df"},
    units="mph",
    facts={"shape": [2016, 207], "date_range": ["2012-03-01 00:00", "2012-03-07 23:55"], "interval_minutes": 5,
           "missing_share": 0.0},
    description="Embedded real sample: the first week of METR-LA (speeds via T-GCN, graph via DCRNN; MIT)",
))

for _side in SIDES:
    _register(CitySpec(
        name=f"metr-la-{_side}",
        directory=REGISTERED["metr-la-week"].directory,
        series=REGISTERED["metr-la-week"].series,
        graph=REGISTERED["metr-la-week"].graph,
        locations=REGISTERED["metr-la-week"].locations,
        series_options=REGISTERED["metr-la-week"].series_options,
        units="mph",
        subset={"parent": "metr-la-week", "side": _side},
        facts={"shape": [2016, 103 if _side == "west" else 104], "interval_minutes": 5, "missing_share": 0.0,
               "date_range": ["2012-03-01 00:00", "2012-03-07 23:55"]},
        description=f"Embedded real sample: the METR-LA week's sensors {_side} of the median longitude",
    ))


# --------------------------------------------------------------------- user cities
_FILE_KEYS = {"url", "hf_repo", "hf_path", "sha256"}


def _remote(city: str, role: str, value) -> RemoteFile | None:
    if value is None:
        return None
    if isinstance(value, str):
        return RemoteFile(value)
    if isinstance(value, dict) and "name" in value and set(value) - {"name"} <= _FILE_KEYS:
        return RemoteFile(**value)
    raise ConfigError(
        f"cities.{city}.{role}: expected a file name or a mapping with 'name' and optionally "
        f"{', '.join(sorted(_FILE_KEYS))}; got {value!r}"
    )


def city_from_dict(name: str, entry: dict) -> CitySpec:
    """Build a CitySpec from a `cities:` entry of params.yaml.

    Keys: directory, series, graph, locations (file names, or mappings {name, url, hf_repo, hf_path, sha256}),
    graph_format, series_options, interval_minutes, units, null_value, nan_as_missing, facts, subset, description.
    """
    if not isinstance(entry, dict):
        raise ConfigError(f"cities.{name}: expected a mapping of city keys, got {type(entry).__name__}")
    allowed = {f.name for f in fields(CitySpec)} - {"name"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"cities.{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if "series" not in entry and "subset" not in entry:
        raise ConfigError(f"cities.{name}: a 'series' file is required")
    entry = dict(entry)
    if "subset" in entry:
        parent = get_city(entry["subset"].get("parent", ""), {})
        for key in ("directory", "series", "graph", "locations", "series_options", "units"):
            entry.setdefault(key, getattr(parent, key))
        if entry["subset"].get("side") not in SIDES:
            raise ConfigError(f"cities.{name}.subset.side: expected one of {', '.join(SIDES)}")
    entry.setdefault("directory", f"data/raw/{name}")
    for role in ROLES:
        if not isinstance(entry.get(role), RemoteFile):
            entry[role] = _remote(name, role, entry.get(role))
    return CitySpec(name=name, **entry)


def get_city(name: str, extra: dict | None = None) -> CitySpec:
    """The spec of city `name`: a user city from `extra` (params.yaml `cities:`) first, then the table."""
    extra = extra or {}
    if name in extra:
        return city_from_dict(name, extra[name])
    if name in REGISTERED:
        return REGISTERED[name]
    known = sorted(set(REGISTERED) | set(extra))
    raise ConfigError(f"unknown city {name!r}; known cities: {', '.join(known)}")


def list_cities(extra: dict | None = None) -> list[str]:
    return sorted(set(REGISTERED) | set(extra or {}))


def city_table(extra: dict | None = None, processed_dir: str = "data/processed", root: str = ".") -> list[dict]:
    """One row per city for `graphtune cities`: name, shape, interval, description.

    Shape and interval come from the city's fact block, else from its processed meta.json once `prepare`
    has run; "?" when neither knows. A bad user entry raises ConfigError naming it.
    """
    import json
    from pathlib import Path

    rows = []
    for name in list_cities(extra):
        spec = get_city(name, extra)
        facts = dict(spec.facts)
        meta_path = Path(root, processed_dir, name, "meta.json")
        if ("shape" not in facts or "interval_minutes" not in facts) and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                facts.setdefault("shape", meta.get("shape"))
                facts.setdefault("interval_minutes", meta.get("interval_minutes"))
            except (OSError, ValueError):
                pass  # an unreadable record only leaves the listing with "?"
        shape = "x".join(map(str, facts.get("shape") or [])) or "?"
        minutes = facts.get("interval_minutes") or spec.interval_minutes
        rows.append({"name": name, "shape": shape, "interval": f"{minutes:g} min" if minutes else "? min",
                     "description": spec.description})
    return rows
