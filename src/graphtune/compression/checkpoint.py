"""A compressed model on disk: (kind, name, config, state_dict), rebuilt from its config and loaded strictly.

    save_compressed(path, kind="network", name="vgg", config={...}, state=model.state_dict())
    load_compressed(path, build) -> (model, checkpoint)

The module itself is never pickled: `build(kind, name, config)` constructs the architecture the config
describes (its widths included) and the state loads with strict=True. A state whose tensors do not fit
the config (widths edited by hand, a file from another model) is refused with one line naming both shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from graphtune.errors import DataError

FORMAT = "graphtune-compressed/1"


def save_compressed(path: str | os.PathLike, *, kind: str, name: str, config: dict, state: dict,
                    extra: dict | None = None) -> Path:
    """Write atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "kind": kind, "name": name, "config": config,
               "state": {k: v.detach().cpu() for k, v in state.items()}, "extra": dict(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_compressed(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such compressed-model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"{path}: not a GraphTune compressed model ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path}: not a GraphTune compressed model (expected format {FORMAT})")
    return payload


def load_state_strict(model: torch.nn.Module, state: dict, what: str) -> None:
    """load_state_dict(strict=True) with a one-line DataError naming the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise DataError(f"{what}: the state does not fit its config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise DataError(f"{what}: shapes do not match its config: {key} has shape {tuple(value.shape)} in the "
                            f"file, the config builds {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=True)


def load_compressed(path: str | os.PathLike, build) -> tuple[torch.nn.Module, dict]:
    """The model `build(kind, name, config)` makes, holding the file's state (strict)."""
    payload = read_compressed(path)
    model = build(payload["kind"], payload["name"], payload["config"])
    load_state_strict(model, payload["state"], str(path))
    return model, payload
