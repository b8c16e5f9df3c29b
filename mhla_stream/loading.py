"""``MHLAForCausalLM.from_pretrained`` / ``save_pretrained``: argument checks, dtype, offline name
resolution and the plain-transformers files. Kept apart from the model code in ``modeling.py``."""
from __future__ import annotations

import os

import torch

# arguments transformers' Auto classes and pipelines hand to ``from_pretrained``: they only matter
# for downloading, which never happens here (names resolve to local folders first)
_HUB_ONLY = {"cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
             "trust_remote_code", "code_revision", "_from_auto", "_from_pipeline", "_commit_hash", "adapter_kwargs",
             "use_safetensors", "low_cpu_mem_usage", "resume_download", "use_auth_token", "config", "weights_only",
             "use_kernels", "key_mapping"}
_SUPPORTED = "dtype (torch.dtype, 'float32' / 'bfloat16' / 'float16' or 'auto'), device, weights"


def check_kwargs(kwargs: dict) -> None:
    if "device_map" in kwargs and kwargs["device_map"] is not None:
        raise ValueError(f"device_map={kwargs['device_map']!r} is not supported by MHLAForCausalLM.from_pretrained: "
                         "the model loads onto one device; pass device='cuda' (or 'cpu', 'cuda:1', ...)")
    unknown = sorted(k for k in kwargs if k not in _HUB_ONLY and k != "device_map")
    if unknown:
        raise TypeError(f"MHLAForCausalLM.from_pretrained got unsupported argument(s) {', '.join(unknown)}; "
                        f"supported: {_SUPPORTED}")


def parse_dtype(dtype, tensors: dict[str, torch.Tensor]):
    """None -> float32; 'auto' -> the dtype the floating-point weights are stored in; a string or a
    torch.dtype -> that dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if dtype == "auto":
        stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
        return stored.pop() if len(stored) == 1 else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in names:
        return names[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not supported; use a torch dtype, one of {', '.join(sorted(names))}, "
                     "or 'auto' (the stored dtype)")


def load_local(cls, path, dtype=None, device=None):
    """Reads a checkpoint directory into a model in eval mode; the global torch RNG is left as it was
    (the random initialisation that the loaded weights overwrite runs on a forked RNG)."""
    from transformers import GenerationConfig

    from .checkpoint import check_and_load, read_checkpoint
    config, tensors, _layout = read_checkpoint(path)
    target = parse_dtype(dtype, tensors)
    with torch.random.fork_rng(devices=[]):
        model = cls(config)
    check_and_load(model, tensors, path)
    if os.path.exists(os.path.join(path, "generation_config.json")):
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            from .checkpoint import CheckpointError
            raise CheckpointError(f"{os.path.join(path, 'generation_config.json')}: {e}") from None
    config.__dict__.pop("auto_map", None)  # describes the folder's files, not the model; save writes it anew
    model.source_directory = os.fspath(path)  # where save_pretrained finds the tokenizer to carry along
    model.to(device=device, dtype=target)
    return model.eval()


def save_with_hf_files(model, save_directory, save_base, tokenizer_model=None, **kwargs) -> None:
    """transformers' ``save_pretrained`` plus the files plain transformers needs (``hf_files``).
    The tokenizer is converted first, so a bad tokenizer file fails before anything is written.
    transformers would copy this package's own source files into the folder when the class was
    loaded through ``auto_map``; the shims replace that, so the copy is switched off."""
    from .hf_files import write_hf_files
    from .hf_tokenizer import convert_sentencepiece
    source = tokenizer_model
    if source is None:  # the folder's own tokenizer, else the one of the folder the model came from
        for folder in (save_directory, getattr(model, "source_directory", "")):
            candidate = os.path.join(os.fspath(folder), "tokenizer.model") if folder else ""
            if candidate and os.path.isfile(candidate):
                source = candidate
                break
    converted = convert_sentencepiece(source) if source is not None else None
    saved = model.__dict__.get("_auto_class"), model.config.__dict__.get("_auto_class")
    model._auto_class = model.config._auto_class = None
    try:
        save_base(save_directory, **kwargs)
    finally:
        for obj, value in ((model, saved[0]), (model.config, saved[1])):
            if value is None:
                obj.__dict__.pop("_auto_class", None)
            else:
                obj._auto_class = value
    write_hf_files(save_directory, model.config, source, converted)
