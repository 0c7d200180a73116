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
metr-la-r1 .. metr-la-r5  Five real sub-cities of metr-la-week: its sensors clustered into 5 regions
            by k-means on their coordinates (below), numbered west to east, each with the induced
            subgraph: 36, 28, 52, 51 and 40 sensors (205, 135, 353, 395, 194 directed edges).
montevideo-bus  Embedded real sample (data/sample/montevideo-bus): hourly boardings at 675 bus stops
            of Montevideo, 744 steps (October 2020), COUNTS whose zeros are real readings
            (null_value None), 690 directed links between consecutive stops, read as a 0/1 graph.
            MIT (pytorch_geometric_temporal).

Sub-cities
----------
A city with `subset: {parent: <city>, ...}` reads its parent's files and keeps some of the parent's sensors,
with the induced subgraph (the adjacency rows and columns of the kept sensors, nothing else changed), in the
parent's order; everything else (null value, scaler, splits, meta.json) is computed on the kept sensors. The
parent must be a registered city that is not itself a sub-city, and must have coordinates (a locations
file). Exactly one of two kinds:

- `side: west | east`: the sensors with longitude below / at or above the parent's median longitude.
- `regions: K, region: R` (K >= 2, 1 <= R <= K): the sensors of region R of K k-means regions, defined
  deterministically (graphtune.data.prepare.kmeans_regions):
  1. each sensor's (latitude, longitude) becomes km on a local equirectangular plane around the mean of
     the parent's sensors: x = (lon - mean lon) * 111.32 * cos(mean lat), y = (lat - mean lat) * 110.57;
  2. sklearn.cluster.KMeans(n_clusters=K, n_init=10, random_state=0) clusters the points (x, y);
  3. the clusters are numbered 1..K west to east by their centre's x (ties by y), so region names are stable.
  K above the parent's number of sensors (or of distinct sensor positions) is a one-line DataError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from graphtune.checks import boolean, choice, integer, mapping, number, optional, text
from graphtune.data.fetch import RemoteFile
from graphtune.errors import ConfigError

ROLES = ("series", "graph", "locations")
SIDES = ("west", "east")
SUBSET_KEYS = ("parent", "side", "regions", "region")
REGIONS = 5  # metr-la-r1 .. metr-la-r5: the METR-LA week's sensors in 5 k-means regions

# Masked MAPE leaves out readings with |y| below the city's `mape_floor` (raw units). The default is one unit
# of whatever the city measures, for every unit: for speeds (mph, km/h) a reading under 1 is a stopped vehicle
# or a sensor artefact, whose percentage error explodes (0.3 km/h turns a 2 km/h error into 667%) and says
# nothing about traffic; for counts (vehicles, boardings) 1 is the smallest non-zero count, so MAPE covers
# exactly the non-zero counts, the only ones with a percentage error. A city in other units (occupancy as a
# fraction in [0, 1], say) states its own floor.
DEFAULT_MAPE_FLOOR = 1.0

_DCRNN_RAW = "https://raw.githubusercontent.com/liyaguang/DCRNN/master/data/sensor_graph"
_ZENODO_BAY = "https://zenodo.org/records/4263971/files"


@dataclass(frozen=True)
class CitySpec:
    """How to find, read and describe one city's raw files."""

    name: str
    directory: str  # folder of the raw files, relative to the project root (or absolute)
    series: RemoteFile  # speeds/flows: h5, csv, npy or npz (T x N [x C])
    graph: RemoteFile | None = None  # pkl, dense csv/npy, from,to,cost distances, from,to links; None = coordinates
    locations: RemoteFile | None = None  # sensor_id, latitude, longitude
    # "pkl" | "dense" | "edges" | "links" | "coords"; None = from the file suffix (never "links")
    graph_format: str | None = None
    series_options: dict = field(default_factory=dict)  # key, timestamp_column, start, interval_minutes
    interval_minutes: float | None = None  # None = inferred from the timestamps
    units: str = ""
    # Readings equal to it are missing: the DCRNN convention, 0 = no reading. None = no reading is missing
    # (zeros are real, e.g. counts); NaN then marks the missing ones, with nan_as_missing.
    null_value: float | None = 0.0
    nan_as_missing: bool = False  # NaN in the series is an error unless the city says it means "missing"
    mape_floor: float = DEFAULT_MAPE_FLOOR  # masked MAPE uses only readings with |y| >= it (raw units)
    facts: dict = field(default_factory=dict)  # shape, date_range, interval_minutes, missing_share, edges
    # a geographic sub-city: {"parent": city, "side": "west" | "east"} or {"parent": city, "regions": K,
    # "region": R} (region R of K k-means regions, R in 1..K); see "Sub-cities" above
    subset: dict | None = None
    description: str = ""
    # Whether null_value was stated (any value, even 0) rather than left at its default. Not a key of a city
    # entry: city_from_dict sets it. An unstated 0 that would hide a large share of the readings is refused.
    null_value_stated: bool = False

    def files(self) -> dict[str, RemoteFile]:
        """The city's files by role (series, graph, locations), skipping roles it does not have."""
        return {role: f for role in ROLES if (f := getattr(self, role)) is not None}


REGISTERED: dict[str, CitySpec] = {}


def _register(spec: CitySpec) -> None:
    """Add a reviewed city to the table. Each registration below writes out its null value, so it is stated."""
    if spec.subset is not None:
        check_subset(spec.subset, f"cities.{spec.name}.subset")
    REGISTERED[spec.name] = replace(spec, null_value_stated=True)


def check_subset(subset: dict, option: str) -> dict:
    """`subset` unchanged when it is one of the two sub-city kinds (module docstring, "Sub-cities"), else a
    one-line ConfigError naming `option` or its key (`option`.regions, ...). Does not look the parent up."""
    mapping()(subset, option)
    unknown = sorted(str(key) for key in set(subset) - set(SUBSET_KEYS))
    if unknown:
        raise ConfigError(f"{option}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SUBSET_KEYS)}")
    text(nonempty=True)(subset.get("parent"), f"{option}.parent")
    if ("side" in subset) == ("regions" in subset):
        got = "both" if "side" in subset else "neither"
        raise ConfigError(f"{option}: expected exactly one of 'side' (west or east) or 'regions' (with 'region'), "
                          f"got {got}")
    if "side" in subset:
        if "region" in subset:
            raise ConfigError(f"{option}.region: goes with 'regions', not with 'side'")
        choice(*SIDES)(subset["side"], f"{option}.side")
    else:
        integer(min=2)(subset["regions"], f"{option}.regions")
        integer(min=1, max=subset["regions"])(subset.get("region"), f"{option}.region")
    return subset


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
    null_value=0.0,
    facts={"shape": [34272, 207], "date_range": ["2012-03-01 00:00", "2012-06-27 23:55"], "interval_minutes": 5,
           "missing_share": 0.081, "edges": 1515},
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
    null_value=0.0,
    facts={"shape": [52116, 325], "date_range": ["2017-01-01 00:00", "2017-06-30 23:55"], "interval_minutes": 5,
           "missing_share": 0.00003, "edges": 2369},
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
    null_value=0.0,
    facts={"shape": [2016, 207], "date_range": ["2012-03-01 00:00", "2012-03-07 23:55"], "interval_minutes": 5,
           "missing_share": 0.0, "edges": 1515},
    description="Embedded real sample: the first week of METR-LA (speeds via T-GCN, graph via DCRNN; MIT)",
))

def _register_week_subset(name: str, subset: dict, nodes: int, edges: int, description: str) -> None:
    """A real sub-city of the embedded METR-LA week: the parent's files, units and dates, its own sensors."""
    week = REGISTERED["metr-la-week"]
    _register(CitySpec(
        name=name, directory=week.directory, series=week.series, graph=week.graph, locations=week.locations,
        series_options=week.series_options, units="mph", null_value=0.0, subset={"parent": "metr-la-week", **subset},
        facts={"shape": [2016, nodes], "interval_minutes": 5, "missing_share": 0.0,
               "date_range": ["2012-03-01 00:00", "2012-03-07 23:55"], "edges": edges},
        description=description,
    ))


for _side, (_nodes, _edges) in {"west": (103, 711), "east": (104, 683)}.items():
    _register_week_subset(f"metr-la-{_side}", {"side": _side}, _nodes, _edges,
                          f"Embedded real sample: the METR-LA week's sensors {_side} of the median longitude")

# Region r of the week's sensors in REGIONS k-means regions, numbered west to east: (sensors, directed edges of the
# induced subgraph, self-loops not counted), as `prepare` measures them.
_REGION_FACTS = {1: (36, 205), 2: (28, 135), 3: (52, 353), 4: (51, 395), 5: (40, 194)}
for _region, (_nodes, _edges) in _REGION_FACTS.items():
    _register_week_subset(f"metr-la-r{_region}", {"regions": REGIONS, "region": _region}, _nodes, _edges,
                          f"Embedded real sample: region {_region} of {REGIONS} of the METR-LA week's sensors "
                          "(k-means on coordinates)")


_register(CitySpec(
    name="montevideo-bus",
    directory="data/sample/montevideo-bus",
    series=RemoteFile("bus_inflow.csv", sha256="352e62e329555e9204f079c29095e70115d93c016873b3f222c331a76cfca15b"),
    # 0/1 links, not DCRNN's distance kernel: a link joins two consecutive stops of a bus line, so it is a
    # connection whatever its length. The kernel (std of the link lengths, threshold 0.1) would drop 369 of the
    # 690 links, the longer ones, and leave 216 of the 675 stops with no edge.
    graph=RemoteFile("links.csv", sha256="bdbe9995eaed25b596d82d09d8e0b358a6a23aa6cfb3d15186bd4977be037d68"),
    locations=RemoteFile("stops.csv", sha256="fbe28e7d669aa418411cad986e2ca1483a3cefffda8aabae39bdca2a27aa3e04"),
    graph_format="links",
    series_options={"timestamp_column": "time"},
    interval_minutes=60,
    units="boardings/hour",
    null_value=None,  # 80% of the readings are 0: an hour without a boarding, a real count, not a missing one
    mape_floor=DEFAULT_MAPE_FLOOR,  # counts: MAPE over the hours with at least one boarding
    facts={"shape": [744, 675], "date_range": ["2020-10-01 00:00", "2020-10-31 23:00"], "interval_minutes": 60,
           "missing_share": 0.0, "edges": 690},
    description="Embedded real sample: hourly boardings at Montevideo bus stops, October 2020 "
                "(pytorch_geometric_temporal; MIT)",
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


# What a city entry's values must be, checked before anything is read: a wrong type is one line naming the key.
_ENTRY_CHECKS = {
    "directory": text(nonempty=True),
    "graph_format": optional(text(nonempty=True)),  # its value is checked where the graph is read
    "series_options": mapping(),
    "interval_minutes": optional(number(min=0, min_open=True)),
    "units": text(),
    "null_value": optional(number()),
    "nan_as_missing": boolean(),
    "mape_floor": number(min=0),
    "facts": mapping(),
    "subset": optional(mapping()),
    "description": text(),
}
# What a sub-city takes from its parent unless its entry says otherwise: the parent's files and how to read them.
_INHERITED = ("directory", "series", "graph", "locations", "graph_format", "series_options", "interval_minutes",
              "units", "null_value", "nan_as_missing", "mape_floor")


def city_from_dict(name: str, entry: dict) -> CitySpec:
    """Build a CitySpec from a `cities:` entry of params.yaml (README "Add a city" lists the keys).

    Keys: directory, series, graph, locations (file names, or mappings {name, url, hf_repo, hf_path, sha256}),
    graph_format, series_options, interval_minutes, units, null_value, nan_as_missing, mape_floor, facts, subset,
    description. A key the entry leaves out takes the CitySpec default, or for a sub-city its parent's value.
    subset is {parent, side: west | east} or {parent, regions: K, region: R} (module docstring, "Sub-cities"),
    its parent a registered city that is not itself a sub-city.
    Stating null_value (even 0) marks it confirmed (`CitySpec.null_value_stated`).
    """
    if not isinstance(entry, dict):
        raise ConfigError(f"cities.{name}: expected a mapping of city keys, got {type(entry).__name__}")
    allowed = {f.name for f in fields(CitySpec)} - {"name", "null_value_stated"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"cities.{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if "series" not in entry and "subset" not in entry:
        raise ConfigError(f"cities.{name}: a 'series' file is required")
    for key, check in _ENTRY_CHECKS.items():
        if key in entry:
            check(entry[key], f"cities.{name}.{key}")
    entry = dict(entry)
    stated = "null_value" in entry
    if entry.get("subset") is not None:
        check_subset(entry["subset"], f"cities.{name}.subset")
        parent = get_city(entry["subset"]["parent"], {})
        if parent.subset is not None:  # its files are the grandparent's: the split would be of the wrong city
            raise ConfigError(f"cities.{name}.subset.parent: {parent.name} is itself a sub-city (of "
                              f"{parent.subset['parent']}); name a city that is not")
        stated = stated or parent.null_value_stated
        for key in _INHERITED:
            entry.setdefault(key, getattr(parent, key))
    entry.setdefault("directory", f"data/raw/{name}")
    for role in ROLES:
        if not isinstance(entry.get(role), RemoteFile):
            entry[role] = _remote(name, role, entry.get(role))
    return CitySpec(name=name, null_value_stated=stated, **entry)


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


def percent(share: float) -> str:
    """A share in [0, 1] as a percentage with three significant digits: 0.80413 -> "80.4%", 3e-05 -> "0.003%"."""
    return f"{100 * share:.3g}%"


def city_table(extra: dict | None = None, processed_dir: str = "data/processed", root: str = ".") -> list[dict]:
    """One row per city for `graphtune cities`, every value a string ("?" when unknown).

    Keys: name, nodes, steps, interval ("5 min"), units, missing (share of readings treated as missing, "8.1%"),
    edges (directed, self-loops not counted), description. Each value comes from the city's fact block, else
    from its processed meta.json once `prepare` has run (else, for the interval and the units, from the entry
    itself); "?" when none of them knows. A bad user entry raises ConfigError naming it.
    """
    rows = []
    for name in list_cities(extra):
        spec = get_city(name, extra)
        known = {"interval_minutes": spec.interval_minutes, "units": spec.units or None}
        meta = _processed_meta(Path(root, processed_dir, name, "meta.json"))
        graph = meta.get("graph") if isinstance(meta.get("graph"), dict) else {}
        for source in (known, {"shape": meta.get("shape"), "interval_minutes": meta.get("interval_minutes"),
                               "units": meta.get("units") or None, "missing_share": meta.get("missing_share"),
                               "edges": graph.get("edges")}, spec.facts):
            known.update({key: value for key, value in source.items() if value is not None})  # later sources win
        shape = known.get("shape")
        steps, nodes = shape if isinstance(shape, (list, tuple)) and len(shape) == 2 else ("?", "?")
        minutes, share, edges = known.get("interval_minutes"), known.get("missing_share"), known.get("edges")
        rows.append({
            "name": name, "nodes": str(nodes), "steps": str(steps),
            "interval": f"{minutes:g} min" if minutes else "? min",
            "units": known.get("units") or "?",
            "missing": percent(share) if isinstance(share, (int, float)) else "?",
            "edges": str(edges) if edges is not None else "?",
            "description": spec.description,
        })
    return rows


def _processed_meta(path: Path) -> dict:
    """The city's processed meta.json as a dict; {} when absent or unreadable (the listing then shows "?")."""
    try:
        meta = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
