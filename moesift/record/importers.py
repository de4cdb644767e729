"""Routing records from serving engines into `moesift-trace/1`.

vLLM (``--enable-return-routed-experts``; moesift.record.vllm)
    Completion or chat-completion responses (0.22+ base64 ``.npy`` per choice, or 0.21 JSON lists), JSON
    Lines of them (batch API output too), or offline ``routed_experts`` arrays saved as ``.npy``.

SGLang expert distribution recorder (``--expert-distribution-recorder-mode``; moesift.record.sglang)
    ``stat``, ``per_pass`` and ``per_token`` dumps (``torch.save``, read without running pickled code);
    ``per_token`` dumps give a routing log, the others counts only.

The modules named above describe each layout, how its layer axis maps to the model's MoE layers, and how
records repeated by several ranks are counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.identity import model_config_hash
from ..core.io import check_output_path
from ..formats.checkpoint import load_config_dict, resolve_model_dir
from ..formats.trace import Trace
from .sglang import import_sglang
from .vllm import import_vllm

FORMATS = ("vllm", "sglang")


# ---------------------------------------------------------------------------------------------------------
# model identity
# ---------------------------------------------------------------------------------------------------------


def _model_info(model, n_experts, top_k, moe_layers, model_type) -> dict[str, Any]:
    info: dict[str, Any] = {"name": None, "model_type": model_type, "config_hash": None, "moe_layers": moe_layers,
                            "n_experts": n_experts, "top_k": top_k, "n_shared": None}
    if model is None:
        return info

    d = resolve_model_dir(model)
    cfg = load_config_dict(d)
    spec = adapter_for(cfg).spec(cfg)
    info.update({
        "name": str(model), "model_type": spec.model_type, "config_hash": model_config_hash(d),
        "moe_layers": [int(x) for x in spec.moe_layers], "n_experts": int(spec.n_experts), "top_k": int(spec.top_k),
        "n_shared": spec.n_shared, "n_group": spec.n_group, "topk_group": spec.topk_group,
    })
    if cfg.get("hidden_size"):
        info["hidden_size"] = int(cfg["hidden_size"])
    if cfg.get("num_hidden_layers"):
        info["num_hidden_layers"] = int(cfg["num_hidden_layers"])
    return info


def import_trace(path, format: str, model=None, out=None, n_experts: int | None = None, top_k: int | None = None,
                 moe_layers=None, label: str | None = None, folds: int = 8, force: bool = False,
                 json: bool = False) -> Trace:
    """Import a serving engine's routing records (``format`` "vllm" or "sglang") into a moesift trace.

    Model identity comes from ``model`` (a model directory or cached hub id: MoE layers, experts, top-k and the
    config hash, so the trace merges with traces of the same model) or from ``n_experts`` / ``top_k`` /
    ``moe_layers``. Several files (e.g. one per rank or per machine) may be given as a list; they are read in
    order into one trace. Writes ``out`` when given.
    """
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise MoesiftError(f"unknown --format {format!r}; choose vllm or sglang")
    for p in paths:
        if not p.is_file():
            raise MoesiftError(f"{str(p)!r} not found")
    if out is not None:
        check_output_path(out, force, inputs=paths)
    if moe_layers is not None and isinstance(moe_layers, str):
        moe_layers = [int(x) for x in moe_layers.split(",") if x.strip()]
    minfo = _model_info(model, n_experts, top_k, list(moe_layers) if moe_layers is not None else None, None)
    label = label or paths[0].stem
    sources = [{"path": str(p)} for p in paths]
    if fmt == "vllm":
        t = import_vllm(paths, minfo, label, sources, folds)
    else:
        t = import_sglang(paths, minfo, label, sources, folds)
    if out is not None:
        t.save(out, force=force, inputs=paths)
    return t



def import_summary(t: Trace, out: Any, format: str) -> dict[str, Any]:
    """What `moesift import --json` prints about a trace imported into `out`."""
    log = t.get("routing_log")
    return {"out": out, "format": format, "moe_layers": t.n_layers, "n_experts": t.n_experts, "top_k": t.top_k,
            "tokens_logged": 0 if log is None else int(log.shape[0]), "routes": int(t.counts.sum()),
            "moe_decoder_layers": t.model.get("moe_layers"), "num_hidden_layers": t.model.get("num_hidden_layers"),
            "hidden_size": t.model.get("hidden_size"), "imported_from": t.tool.get("imported_from"),
            "duplicate_rank_records": int(t.tool.get("duplicate_rank_records", 0)),
            "notes": list(t.tool.get("notes") or [])}


def format_import(info: dict[str, Any]) -> str:
    """The lines `moesift import` prints (`info`: import_summary)."""
    text = (f"wrote {info['out']}: {info['moe_layers']} MoE layers x {info['n_experts']} experts, "
            f"{info['tokens_logged']} tokens logged, {info['routes']} routes ({info['imported_from']})")
    if info["duplicate_rank_records"]:
        text += (f"\n  {info['duplicate_rank_records']} records repeated by another rank's file were counted "
                 "once")
    for note in info.get("notes") or []:
        text += f"\n  note: {note}"
    return text
