"""The parameter dataset: every source node model's parameters as one vector, with its node and prompts.

Layout of a vector (P values): the node model's tensors in `layout` order (`NodeModels.param_names`, the
order `named_parameters` gives: start, temporal.0..7, skip.0..7, graph.0..6 (each `.mlp.weight`), end1,
end2), each flattened row-major. `meta.json` records every tensor's name, shape and offset, so a vector is
readable without the code.

Normalisation, per tensor across nodes (GPD clamps raw weights to [-1, 1], which truncates every weight
above 1; we do not): with shared initialisation every node's weights sit near one common draw, so the
signal is each node's deviation from the source mean. `mean` is the per-element mean over the source
nodes the denoiser trains on, `std` one pooled standard deviation of those deviations per tensor:

    z = (w - mean) / std[tensor]          w = z * std[tensor] + mean

Files, written atomically into one folder (a DVC output):
    params.npz   vectors (M, P) float32, spatial (M, Ds), temporal (M, Dt), mean (P,), train (M,) bool
    meta.json    version, node model and options, layout (name, shape, offset, graph), per-tensor std,
                 prompt feature names, node ids (city:sensor), source cities, the vectors' sha256 (`hash`)
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from graphtune.errors import DataError
from graphtune.fileio import atomic_directory

FORMAT_VERSION = 1  # bump when the vector layout or the normalisation changes
FILES = ("params.npz", "meta.json")


@dataclass
class ParamSet:
    """The source node models of one collection: raw vectors, prompts, the split and the normalisation."""

    vectors: np.ndarray  # (M, P) float32, raw parameters
    spatial: np.ndarray  # (M, Ds) float32 raw spatial prompts (Ds may be 0)
    temporal: np.ndarray  # (M, Dt) float32 raw temporal prompts (Dt may be 0)
    node_ids: list[str]  # "city:sensor" per row
    cities: list[str]  # the source cities, in collection order
    layout: list[dict]  # per tensor: name, shape, offset, numel, graph
    model: str  # the node model's registered name
    model_kwargs: dict  # its resolved options
    spatial_names: list[str] = field(default_factory=list)
    temporal_names: list[str] = field(default_factory=list)
    train: np.ndarray | None = None  # (M,) bool: rows the denoiser trains on; the rest select its checkpoint
    mean: np.ndarray | None = None  # (P,) float32
    std: np.ndarray | None = None  # (n_tensors,) float32
    extra: dict = field(default_factory=dict)  # provenance: collection settings, per-city fit summaries
    encoder: tuple = field(default_factory=lambda: ("stats", {}))  # the temporal prompt encoder (name, state) the temporal prompts came from

    @property
    def numel(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def hash(self) -> str:
        """sha256 of the raw vectors, the prompts and the split: the dataset's identity (logged with every use)."""
        h = hashlib.sha256()
        for a in (self.vectors, self.spatial, self.temporal, self.train_mask):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps([self.node_ids, self.layout, self.model_kwargs], sort_keys=True).encode())
        return h.hexdigest()

    @property
    def train_mask(self) -> np.ndarray:
        return np.ones(len(self.node_ids), bool) if self.train is None else self.train

    def fit_normalisation(self) -> "ParamSet":
        """Per-element mean and per-tensor pooled std of the deviations, over the training rows only."""
        rows = self.vectors[self.train_mask].astype(np.float64)
        mean = rows.mean(0)
        dev = rows - mean
        std = np.array([np.sqrt(np.mean(dev[:, t["offset"]:t["offset"] + t["numel"]] ** 2)) for t in self.layout])
        self.mean, self.std = mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)
        return self

    def _std_per_element(self) -> np.ndarray:
        return np.repeat(self.std, [t["numel"] for t in self.layout])

    def normalise(self, vectors: np.ndarray) -> np.ndarray:
        return ((vectors - self.mean) / self._std_per_element()).astype(np.float32)

    def denormalise(self, z: np.ndarray) -> np.ndarray:
        return (z * self._std_per_element() + self.mean).astype(np.float32)

    @classmethod
    def merge(cls, sets: list["ParamSet"]) -> "ParamSet":
        """The rows of several collections of one node model (e.g. one per source city), normalised afresh."""
        first = sets[0]
        for other in sets[1:]:
            if other.layout != first.layout or other.model_kwargs != first.model_kwargs:
                raise DataError(f"cannot merge parameter datasets of different node models ({first.cities} and "
                                f"{other.cities})")
        if any(ps.encoder[0] != "stats" for ps in sets) and len(sets) > 1:
            raise DataError("cannot merge parameter datasets whose temporal prompts come from learned encoders: "
                            "collect the cities together")
        fits = {k: v for ps in sets for k, v in ps.extra.get("fits", {}).items()}
        merged = cls(vectors=np.concatenate([ps.vectors for ps in sets]),
                     spatial=np.concatenate([ps.spatial for ps in sets]),
                     temporal=np.concatenate([ps.temporal for ps in sets]),
                     node_ids=[i for ps in sets for i in ps.node_ids], cities=[c for ps in sets for c in ps.cities],
                     layout=first.layout, model=first.model, model_kwargs=first.model_kwargs,
                     spatial_names=first.spatial_names, temporal_names=first.temporal_names,
                     train=np.concatenate([ps.train_mask for ps in sets]), extra=dict(first.extra, fits=fits))
        return merged.fit_normalisation()

    # ------------------------------------------------------------------ files
    def meta(self) -> dict:
        return {"version": FORMAT_VERSION, "model": self.model, "model_kwargs": self.model_kwargs,
                "layout": self.layout, "std": [float(s) for s in self.std], "node_ids": self.node_ids,
                "cities": self.cities, "spatial_names": self.spatial_names, "temporal_names": self.temporal_names,
                "rows": len(self.node_ids), "numel": self.numel, "hash": self.hash, "extra": self.extra,
                "encoder": {"name": self.encoder[0],
                            **{k: v for k, v in self.encoder[1].items() if k != "state"}}}

    def save(self, folder: str | Path) -> Path:
        """Write params.npz and meta.json into `folder` atomically (only a folder GraphTune wrote is replaced)."""
        folder = Path(folder)
        with atomic_directory(folder, legacy_names=FILES) as tmp:
            encoder_state = {f"encoder/{k}": v.numpy() for k, v in self.encoder[1].get("state", {}).items()}
            write_npz(tmp / "params.npz", {"vectors": self.vectors, "spatial": self.spatial, "temporal": self.temporal,
                                           "mean": self.mean, "train": self.train_mask, **encoder_state})
            (tmp / "meta.json").write_text(json.dumps(self.meta(), indent=1, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, model: str | None = None, model_kwargs: dict | None = None,
             layout: list[dict] | None = None) -> "ParamSet":
        """Read a parameter dataset; DataError (one line, naming the file) when it is missing, of another format
        version, of another node model (name, options or tensor layout than the ones given), or inconsistent."""
        folder = Path(folder)
        meta_path, npz_path = folder / "meta.json", folder / "params.npz"
        for p in (meta_path, npz_path):
            if not p.is_file():
                raise DataError(f"{p}: parameter dataset file not found (run `graphtune gpd collect` first)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{meta_path}: not valid JSON") from None
        if meta.get("version") != FORMAT_VERSION:
            raise DataError(f"{meta_path}: parameter dataset format version {meta.get('version')!r}, this GraphTune "
                            f"reads version {FORMAT_VERSION}; collect again")
        if model is not None and meta.get("model") != model:
            raise DataError(f"{meta_path}: vectors of node model {meta.get('model')!r}, expected {model!r}")
        if model_kwargs is not None and meta.get("model_kwargs") != model_kwargs:
            raise DataError(f"{meta_path}: node model options {meta.get('model_kwargs')} differ from gpd.model_kwargs "
                            f"resolved as {model_kwargs}; collect again")
        if layout is not None and [(t["name"], list(t["shape"])) for t in meta.get("layout", [])] != \
                [(t["name"], list(t["shape"])) for t in layout]:
            raise DataError(f"{meta_path}: the vectors' tensor layout differs from the node model's; collect again")
        try:
            with np.load(npz_path) as z:
                arrays = {k: z[k] for k in ("vectors", "spatial", "temporal", "mean", "train")}
                encoder_state = {k[len("encoder/"):]: torch.from_numpy(z[k]) for k in z.files
                                 if k.startswith("encoder/")}
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{npz_path}: not a GraphTune parameter dataset ({type(err).__name__})") from None
        ps = cls(vectors=arrays["vectors"], spatial=arrays["spatial"], temporal=arrays["temporal"],
                 node_ids=list(meta["node_ids"]), cities=list(meta["cities"]), layout=meta["layout"],
                 model=meta["model"], model_kwargs=meta["model_kwargs"], spatial_names=meta["spatial_names"],
                 temporal_names=meta["temporal_names"], train=arrays["train"].astype(bool), mean=arrays["mean"],
                 std=np.asarray(meta["std"], np.float32), extra=meta.get("extra", {}))
        enc = dict(meta.get("encoder") or {"name": "stats"})
        name = enc.pop("name")
        ps.encoder = (name, enc | ({"state": encoder_state} if encoder_state else {}))
        if ps.vectors.shape != (meta["rows"], meta["numel"]) or ps.hash != meta["hash"]:
            raise DataError(f"{npz_path}: arrays do not match {meta_path} (shape or sha256 differ); collect again")
        return ps


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz that np.load reads, byte-stable (a DVC output): np.savez stamps each member with the current
    time, so the members are written here with a fixed date, uncompressed, in the given order."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def layout_of(param_shapes: dict[str, tuple[int, ...]], graph_prefix: str = "graph.") -> list[dict]:
    """The vector layout of a node model: per tensor in order, name, shape, offset, numel, graph-related flag."""
    layout, offset = [], 0
    for name, shape in param_shapes.items():
        numel = int(np.prod(shape))
        layout.append({"name": name, "shape": list(shape), "offset": offset, "numel": numel,
                       "graph": name.startswith(graph_prefix)})
        offset += numel
    return layout
