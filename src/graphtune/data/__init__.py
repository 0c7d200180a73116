"""City table, raw-file loaders, remote fetching, preparation and the dataset bundle.

Names are imported from their modules on first use (PEP 562): `graphtune cities` reads the city table
without loading torch.
"""

from __future__ import annotations

import importlib

_API = {
    "DatasetBundle": "graphtune.data.bundle", "Scaler": "graphtune.data.bundle",
    "CitySpec": "graphtune.data.cities", "get_city": "graphtune.data.cities", "list_cities": "graphtune.data.cities",
    "prepare_dataset": "graphtune.data.prepare", "write_processed": "graphtune.data.prepare",
    "synthetic_bundle": "graphtune.data.synthetic",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'graphtune.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
