"""Training checkpoints: one safetensors file holding the weights, the optimizer state and (in its
header) the JSON metadata: step, best validation loss, elapsed time, the run's arguments.

Nothing is unpickled when a checkpoint is read. Tensors are keyed by parameter name, and the
optimizer state of plain DDP is the same full state on every rank, so a checkpoint written by N
ranks resumes on any number of ranks. Writes go to a temporary file that replaces the old one
(``os.replace``), so a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT = "mhla-train-v1"
FILENAME = "ckpt.safetensors"
LEGACY_FILENAME = "ckpt.pt"  # the earlier torch.save layout, read with weights_only=True


class TrainCheckpointError(ValueError):
    pass


def _named_params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())  # tied weights appear once


def save(path: Path, model, opt, meta: dict) -> None:
    from safetensors.torch import save_file
    params = _named_params(model)
    name_of = {id(p): n for n, p in params.items()}
    tensors = {f"model/{n}": p.detach().to("cpu").contiguous() for n, p in params.items()}
    groups, scalars = [], {}
    for group in opt.param_groups:
        names = [name_of[id(p)] for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "param_names": names})
        for p, n in zip(group["params"], names):
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"opt/{n}/{key}"] = value.detach().to("cpu").contiguous()
                else:
                    scalars[f"{n}/{key}"] = value
    header = {"format": FORMAT, "meta": json.dumps(meta),
              "optimizer": json.dumps({"groups": groups, "scalars": scalars})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, model, opt, device) -> dict:
    """Restores ``model`` and ``opt`` from ``path`` and returns the metadata. Everything is checked
    before anything is changed: on an error the model and optimizer are as they were."""
    if path.name.endswith(".pt"):
        return _load_legacy(path, model, opt, device)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainCheckpointError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
    if header.get("format") != FORMAT:
        raise TrainCheckpointError(f"{path}: not an mhla-train checkpoint (format {header.get('format')!r})")
    try:
        meta, optim = json.loads(header["meta"]), json.loads(header["optimizer"])
        if not all(isinstance(meta.get(k), (int, float)) for k in ("step", "best", "elapsed")):
            raise ValueError
    except (KeyError, ValueError, AttributeError):
        raise TrainCheckpointError(f"{path}: damaged metadata") from None
    params = _named_params(model)
    saved = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise TrainCheckpointError(f"{path}: another model (missing {missing[:3]}, unexpected {extra[:3]})")
    for n, p in params.items():
        if saved[n].shape != p.shape:
            raise TrainCheckpointError(f"{path}: {n} has shape {tuple(saved[n].shape)}, the model {tuple(p.shape)}")
    state = _optimizer_state(path, opt, optim, tensors, params)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))
    opt.load_state_dict(state)
    return meta


def _optimizer_state(path, opt, optim, tensors, params) -> dict:
    """The saved optimizer state as ``opt.state_dict()`` would give it for this model's parameters."""
    name_of = {id(p): n for n, p in params.items()}
    saved_groups, scalars = optim.get("groups", []), optim.get("scalars", {})
    live_names = [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
    if len(saved_groups) != len(live_names) or any(
            sorted(g.get("param_names", [])) != sorted(names) for g, names in zip(saved_groups, live_names)):
        raise TrainCheckpointError(f"{path}: optimizer parameter groups do not match this model")
    groups, state, index = [], {}, 0
    for saved, names in zip(saved_groups, live_names):
        for i, n in enumerate(names, start=index):
            entry = {k[len(f"opt/{n}/"):]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
            entry.update({k[len(f"{n}/"):]: v for k, v in scalars.items() if k.startswith(f"{n}/")})
            if entry:
                state[i] = entry
        groups.append({**{k: v for k, v in saved.items() if k != "param_names"},
                       "params": list(range(index, index + len(names)))})
        index += len(names)
    return {"state": state, "param_groups": groups}


def _load_legacy(path: Path, model, opt, device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    except Exception as e:  # noqa: BLE001 -- any failure to read is one clear line
        raise TrainCheckpointError(f"{path}: cannot read legacy checkpoint: damaged, for another model, or holding "
                                   f"pickled objects, which are never run ({str(e).splitlines()[0][:200]})") from None
    return {"step": state["step"], "best": state["best"], "elapsed": state["elapsed"]}
