"""Finding and loading models: local directories or hub ids resolved through the local hub cache."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import MoesiftError


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory for `model`: the path itself, or the hub cache snapshot of a hub id (offline)."""
    p = Path(model)
    if p.is_dir():
        return p
    s = str(model)
    if p.exists():
        raise MoesiftError(f"{s!r} is a file; pass the model directory")
    if s.count("/") == 1 and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
        except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
            raise MoesiftError(
                f"model {s!r} is neither a local directory nor in the local Hugging Face cache "
                "(download it first with `hf download`, or pass a directory)"
            ) from None
    raise MoesiftError(f"model directory {s!r} not found")


def check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use, in one line (before any weight is read)."""
    import torch

    if device in (None, "auto", "cpu"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MoesiftError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MoesiftError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use "
                               "--device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MoesiftError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise MoesiftError(f"--device {device}: Apple MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise MoesiftError(f"--device {device}: moesift runs on cpu, cuda[:N], mps or auto, not {dev.type}")


def parse_dtype(dtype: str | None) -> Any:
    import torch

    if dtype in (None, "auto"):
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise MoesiftError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


def load_model(
    model: str | os.PathLike,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer or None). `device` "auto" spreads layers over GPUs with device_map="auto"."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import adapter_for

    check_device(device)
    d = resolve_model_dir(model)
    try:
        config = AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        raise MoesiftError(f"cannot read the config of {str(d)!r}: {str(e).splitlines()[0]}") from None
    adapter_for(config)  # clear error for unsupported / dense models before loading any weight
    from .checkpoint import shard_files

    shard_files(d)  # refuse pickle-only checkpoints before loading
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code}
    if device == "auto":
        require_accelerate()
        kwargs["device_map"] = "auto"
    elif device != "cpu" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = device  # weights go straight to the device, not through host memory
    m = AutoModelForCausalLM.from_pretrained(d, **kwargs)
    if "device_map" not in kwargs:
        m.to(device)
    m.eval()
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - models without a tokenizer can still be traced from token ids
        tok = None
    return m, tok


def require_accelerate() -> None:
    """`--device auto` (layers spread over devices) needs the accelerate package."""
    if importlib.util.find_spec("accelerate") is None:
        raise MoesiftError('--device auto spreads the model over GPUs with accelerate; '
                           'install it with `pip install "moesift[multigpu]"`')


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """Show transformers' own progress bars (weight loading) only when `enabled`."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was:
            hf_logging.enable_progress_bar()
