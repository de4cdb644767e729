"""Finding and loading models: local directories or hub ids resolved through the local hub cache."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..formats.checkpoint import CheckpointIndex, resolve_model_dir
from ..formats.workload import TOKENIZER_FILES

DEVICE_HELP = ("auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N, mps, or spread (layers over "
               "every GPU and the host, with accelerate)")


def resolve_device(device: str | None) -> str:
    """The device a command runs on. "auto" (and None) picks CUDA when torch sees a GPU, else Apple MPS, else
    the CPU; any other value is checked (`check_device`) and returned as it is."""
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    check_device(device)
    return str(device)


def check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use, in one line (before any weight is read)."""
    import torch

    if device in (None, "auto", "spread", "cpu"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MoesiftError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
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
        raise MoesiftError(f"--device {device}: moesift runs on cpu, cuda[:N], mps, auto or spread, not {dev.type}")


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
    """(model, tokenizer or None). `device`: see `resolve_device`; "spread" places layers over every GPU (and
    the host when they are full) with accelerate's device_map="auto"."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_device(device)
    d = resolve_model_dir(model)
    try:
        config = AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        raise MoesiftError(f"cannot read the config of {str(d)!r}: {str(e).splitlines()[0]}") from None
    adapter_for(config)  # clear error for unsupported / dense models before loading any weight

    # every header checked (pickle-only checkpoints refused) and the config checked against the tensors,
    # before any weight is read
    CheckpointIndex.build(d).check_consistent()
    device = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code}
    if device == "spread":
        require_accelerate()
        kwargs["device_map"] = "auto"
    elif device != "cpu" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = device  # weights go straight to the device, not through host memory
    m = from_pretrained_checked(AutoModelForCausalLM, d, d, **kwargs)
    if "device_map" not in kwargs:
        m.to(device)
    m.eval()
    return m, load_tokenizer(d, trust_remote_code)


def load_tokenizer(directory: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model directory, or None when it holds no tokenizer files (such a model still runs
    on pre-tokenized data). Tokenizer files that cannot be read are one error line, not "no tokenizer"."""
    from transformers import AutoTokenizer

    d = Path(directory)
    present = [f for f in TOKENIZER_FILES if (d / f).is_file()]
    if not present:
        return None
    try:
        return AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure to read the files is the same problem for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MoesiftError(f"cannot read the tokenizer of {str(d)!r} ({', '.join(present)}): {first}; repair "
                           "or remove the tokenizer files") from None


def from_pretrained_checked(cls: Any, source: Any, where: str | os.PathLike, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source, **kwargs)`, refusing a model any of whose weights the checkpoint does not
    provide: transformers would initialise them at random and the model would run with them."""
    m, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MoesiftError(f"{str(where)!r}: the checkpoint holds no weights for {missing[0]}{more}, which the config "
                           f"(model_type {getattr(m.config, 'model_type', None)!r}) needs; config.json does not "
                           "describe the tensors of this checkpoint")
    return m


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


TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E8M0": "float8_e8m0fnu",
}


def config_obj(d: Mapping[str, Any]) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = d.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise MoesiftError(f"transformers does not know model_type {mt!r}")
    cls = CONFIG_MAPPING[mt]
    decode = getattr(cls, "_decode_special_floats", None)  # config.json spells inf / nan as {"__float__": ...}
    return cls.from_dict(decode(dict(d)) if decode else dict(d))


def config_like(d: Mapping[str, Any], config: Any) -> Any:
    """The config of dict `d`, with the attention and experts implementations `config` was loaded with."""
    c = config_obj(d)
    for attr in ("_attn_implementation", "_experts_implementation"):
        v = getattr(config, attr, None)
        if v is not None:
            try:
                setattr(c, attr, v)
            except Exception:  # noqa: BLE001 - older configs may not allow it
                pass
    return c


def model_class(config: Any) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise MoesiftError(f"no causal-LM class for {config.model_type!r} in transformers") from None
