"""Quality of a MoE model under routing changes: token-weighted perplexity on held-out text.

`eval_model(model, data, plans=..., top_k=..., top_p=...)` scores the same token windows under several
routing settings, one forward pass over the data per setting:

- ``full``: the model as it is;
- ``plan``: routing restricted to a plan's resident experts (`moesift.restrict`; by the restriction
  semantics this is also the perplexity of the trimmed checkpoint);
- ``top_k``: k experts per token instead of the model's top-k (the expert-count override llama.cpp
  exposes); the family's own weight normalisation applies to the k chosen;
- ``top_p``: dynamic routing ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models", Huang et
  al. 2024): per token, the smallest set of experts, most probable first, whose router probability
  reaches p. Router probabilities are the softmax over experts; for sigmoid routers the scores are
  normalised to sum to one. Experts are chosen by probability alone (selection biases and group limits
  are not applied) and weighted as the family weights its own selection (renormalised over the set
  when the family renormalises its top-k, times any routed scaling factor).

Perplexity is exp(sum of token negative log-likelihoods / tokens scored), padding excluded. Documents
longer than ``max_length`` tokens are cut into consecutive windows of ``max_length`` tokens, each scored
on its own (the first token of a window is context only). Beside each perplexity: the mean number of
routed experts active per token and MoE layer (experts given a non-zero weight), measured in the forward.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..arch.registry import adapter_for
from ..core.errors import MoesiftError
from ..core.identity import loaded_config_dict
from ..core.progress import progress_bar
from ..engines.choose import require
from ..engines.hf import hf_progress, load_model, resolve_device
from ..engines.mlx_eval import eval_mlx, open_index
from ..engines.mlx_native import is_mlx_model
from ..engines.restrict import restrict
from ..formats.plan import as_plan, resident_for
from ..formats.workload import batches, read_documents, token_windows
from .eval_gguf import eval_llamacpp, uses_llamacpp

# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def batch_nll(logits: Any, input_ids: Any, attention_mask: Any) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, tokens scored) of one batch: position t predicts
    token t+1; only pairs where both positions are real tokens count."""
    import torch
    import torch.nn.functional as F

    pred = logits[:, :-1, :].float()
    target = input_ids[:, 1:]
    valid = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1).to(pred.device), reduction="none")
    nll = nll.reshape(target.shape) * valid.to(nll.device)
    return float(nll.sum(dtype=torch.float64)), int(valid.sum())


# ------------------------------------------------------------------------------------------------
# Routing settings
# ------------------------------------------------------------------------------------------------


def top_p_chooser(p: float) -> Any:
    """`choose(moe_index, probs [T, E]) -> (ids [T, K'], active [T, K'])` for dynamic top-p routing."""
    import torch

    def choose(_m: int, probs: Any) -> tuple[Any, Any]:
        q = probs.float()
        q = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        sq, order = torch.sort(q, dim=-1, descending=True)
        need = ((sq.cumsum(dim=-1) < p).sum(dim=-1) + 1).clamp(max=q.shape[-1])
        width = int(need.max()) if need.numel() else 1
        active = torch.arange(width, device=q.device)[None, :] < need[:, None]
        return order[:, :width], active

    return choose


def _settings(plans: Sequence[Any], top_k: Sequence[int], top_p: Sequence[float], spec: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "full", "kind": "full"}]
    for i, pl in enumerate(plans):
        src = str(pl) if isinstance(pl, (str, os.PathLike)) else getattr(pl, "source", None)
        out.append({"name": f"plan {Path(src).name}" if src else f"plan {i + 1}", "kind": "plan", "plan": pl,
                    "source": src})
    for k in top_k:
        k = int(k)
        if not 1 <= k <= spec.n_experts:
            raise MoesiftError(f"--top-k {k} is out of range 1..{spec.n_experts}")
        out.append({"name": f"top-k {k}", "kind": "top_k", "k": k})
    for p in top_p:
        p = float(p)
        if not 0 < p <= 1:
            raise MoesiftError(f"--top-p must be in (0, 1] (got {p})")
        out.append({"name": f"top-p {p:g}", "kind": "top_p", "p": p})
    return out


@contextlib.contextmanager
def _apply(model: Any, adapter: Any, setting: dict[str, Any]):
    kind = setting["kind"]
    if kind == "full":
        yield
    elif kind == "plan":
        with restrict(model, setting["plan"], force_plan=setting.get("force_plan", False)):
            yield
    elif kind == "top_k":
        with adapter.set_top_k(model, setting["k"]):
            yield
    elif kind == "top_p":
        with adapter.reroute(model, top_p_chooser(setting["p"])):
            yield
    else:  # pragma: no cover - settings are built above
        raise ValueError(kind)


@contextlib.contextmanager
def _recording(model: Any, adapter: Any, counter: Any):
    # entered after the routing setting, so the counter sees the (ids, weights) the experts really get
    handles = adapter.attach_recorder(model, counter)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _ActiveCounter:
    """Counts routed experts with a non-zero weight per real (non-padding) token, on the device."""

    def __init__(self) -> None:
        self.mask: Any = None
        self.total: Any = 0
        self.tokens: Any = 0

    def __call__(self, m: int, route: Any) -> None:
        w = route.weights
        n = (w != 0).sum(dim=-1)
        if self.mask is not None and self.mask.shape[0] == n.shape[0]:
            mk = self.mask.to(n.device)
            self.total = self.total + (n * mk).sum()
            self.tokens = self.tokens + mk.sum()
        else:
            self.total = self.total + n.sum()
            self.tokens = self.tokens + n.numel()

    def mean(self) -> float | None:
        t = float(self.tokens)
        return float(self.total) / t if t else None


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------


def _model_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def prepare(model: Any, device: str = "auto", dtype: str | None = None, tokenizer: Any = None,
            trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(loaded model in eval mode, tokenizer or None) from a path / hub id or an already loaded model."""
    device = resolve_device(device)
    if isinstance(model, (str, os.PathLike)):
        m, tok = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        return m, (tokenizer if tokenizer is not None else tok)  # load_model: None without tokenizer files
    if not hasattr(model, "config"):
        raise MoesiftError(f"model must be a directory, a hub id or a loaded transformers model, not {type(model).__name__}")
    model.eval()
    return model, tokenizer


def perplexity_runs(
    model: Any,
    adapter: Any,
    batch_list: list[tuple[Any, Any]],
    settings: list[dict[str, Any]],
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Score every batch under every setting; returns one result dict per setting."""
    import torch

    device = next(model.parameters()).device
    counter = _ActiveCounter()
    results = []
    task = progress.add_task("evaluating", total=len(settings) * len(batch_list)) if progress else None
    try:
        for st in settings:
            counter.total, counter.tokens = 0, 0
            nll_sum, n_tok = 0.0, 0
            with _apply(model, adapter, st), _recording(model, adapter, counter), torch.no_grad():
                for ids, mask in batch_list:
                    counter.mask = mask.reshape(-1)
                    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                    s, n = batch_nll(out.logits, ids, mask)
                    nll_sum += s
                    n_tok += n
                    if progress:
                        progress.update(task, advance=1, description=f"evaluating {st['name']}")
            mean_nll = nll_sum / n_tok if n_tok else float("nan")
            r = {k: v for k, v in st.items() if k != "plan"}
            r.update({"nll": mean_nll, "ppl": math.exp(mean_nll) if n_tok else float("nan"), "tokens": n_tok,
                      "mean_active": counter.mean()})
            results.append(r)
    finally:
        counter.mask = None
    full = next((r for r in results if r["kind"] == "full"), None)
    for r in results:
        r["ppl_ratio"] = r["ppl"] / full["ppl"] if full and full["ppl"] else None
    return results


def eval_model(
    model: Any,
    data: Any,
    plans: Sequence[Any] = (),
    top_k: Sequence[int] = (),
    top_p: Sequence[float] = (),
    max_length: int = 512,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str | None = None,
    json: bool = False,
    progress: bool = True,
    max_samples: int | None = None,
    field: str | None = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    force_plan: bool = False,
    engine: str = "auto",
    hf_model: Any = None,
) -> dict[str, Any]:
    """Token-weighted perplexity of `model` on `data` for the full model, each plan in `plans` (routing
    restricted to its resident experts), each k in `top_k` (experts per token) and each p in `top_p`
    (dynamic top-p routing), with the mean number of routed experts active per token beside each.

    `model`: a directory / hub id, or a loaded transformers model (then pass `tokenizer=` for text data).
    `data`: workload file(s) (text, JSONL with `text` / `messages` / `input_ids`, parquet). A plan made for
    another config of the family is refused unless `force_plan`.

    `engine`: "transformers", "mlx" (an mlx-lm model folder run in mlx-lm in float32: the full model, plans,
    top-k and top-p, with tokens per second; see `moesift.engines.mlx_eval`), "llama.cpp" (a GGUF file run in
    llama-cpp-python: the full file, plans trimmed with moesift's GGUF trim or trimmed GGUF files, top-k through
    llama.cpp's expert-count override, with bytes and tokens/s; `hf_model`: the transformers checkpoint whose
    tokenizer tokenizes; see `moesift.evaluation.eval_gguf`) or "auto" (mlx for an mlx-lm model folder,
    llama.cpp for a GGUF file)."""
    sources = data if isinstance(data, (list, tuple)) else [data]
    if uses_llamacpp(model, engine, top_p, device, dtype):
        return eval_llamacpp(model, sources, plans, top_k, max_length=max_length, max_samples=max_samples,
                             field=field, hf_model=hf_model, tokenizer=tokenizer, force_plan=force_plan,
                             progress=progress and not json)
    if use_mlx(model, engine, device, dtype):
        docs = read_documents(sources, field=field, max_samples=max_samples)
        index = open_index(model)
        res = eval_mlx(index, docs, _settings(plans, top_k, top_p, index.spec), max_length=max_length,
                       batch_size=batch_size, progress=progress and not json, force_plan=force_plan,
                       tokenizer=tokenizer)
        return {"model": _model_name(model), "data": [str(d) for d in sources],
                **{k: v for k, v in res.items() if k != "model"}}
    device = resolve_device(device)

    docs = read_documents(sources, field=field, max_samples=max_samples)

    with hf_progress(progress):
        m, tok = prepare(model, device=device, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    adapter = adapter_for(m.config)
    spec = adapter.spec(m.config)
    settings = _settings(plans, top_k, top_p, spec)

    for st in settings:
        if st["kind"] == "plan":  # checked before any scoring: a wrong plan fails fast
            st["plan"] = as_plan(st["plan"])
            st["force_plan"] = force_plan
            resident_for(st["plan"], spec, loaded_config_dict(m), str(getattr(m, "name_or_path", "") or "") or None,
                         force_plan)
    wins, pad = token_windows(docs, tok, int(getattr(m.config, "vocab_size", 0) or 0), max_length)
    batch_list = batches(wins, batch_size, pad_id=pad)
    with progress_bar(progress and not json) as bar:
        results = perplexity_runs(m, adapter, batch_list, settings, bar)
    return {
        "model": _model_name(model),
        "data": [str(d) for d in sources],
        "documents": len(docs),
        "windows": len(wins),
        "tokens": results[0]["tokens"],
        "max_length": max_length,
        "model_spec": {"n_experts": spec.n_experts, "top_k": spec.top_k, "n_shared": spec.n_shared,
                       "moe_layers": len(spec.moe_layers), "scoring": spec.scoring},
        "results": results,
    }


def use_mlx(model: Any, engine: str, device: str, dtype: str | None) -> bool:
    """Whether `model` is evaluated in mlx-lm; one error line for an engine or option that cannot run there."""
    if engine not in ("auto", "transformers", "mlx"):
        raise MoesiftError(f"unknown engine {engine!r} for eval; choose one of auto, transformers, mlx, llama.cpp")
    folder = isinstance(model, (str, os.PathLike)) and is_mlx_model(model)
    if engine == "transformers" or (engine == "auto" and not folder):
        return False
    if not folder:
        raise MoesiftError(f"--engine mlx evaluates an mlx-lm model folder (mlx_lm.convert writes one); "
                           f"{str(model)!r} is not one")
    require("mlx")
    if dtype not in (None, "float32"):
        raise MoesiftError(f"mlx-lm model folders are evaluated in float32; drop --dtype {dtype}")
    if device not in ("auto", "cpu"):
        raise MoesiftError(f"mlx-lm runs on mlx's default device; drop --device {device}")
    return True


def format_table(result: dict[str, Any]) -> Any:
    """A rich table of an eval result."""
    t = Table(title=f"perplexity on {result['tokens']} tokens ({result['windows']} windows)")
    speed = any(r.get("tokens_per_s") for r in result["results"])  # measured by the mlx-lm evaluation
    engine = "bytes" in result["results"][0]  # llama.cpp: file bytes and speed beside each setting
    cols = ("setting", "ppl", "x full", "active experts / token") + (("tokens/s",) if speed else ()) + (
        ("MB", "prefill tok/s", "decode tok/s") if engine else ())
    for c in cols:
        t.add_column(c, justify="left" if c == "setting" else "right")
    for r in result["results"]:
        ratio = r.get("ppl_ratio")
        act = r.get("mean_active")
        row = [r["name"], f"{r['ppl']:.3f}", "" if ratio is None else f"{ratio:.3f}", "" if act is None else f"{act:.2f}"]
        if speed:
            row.append(f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "")
        if engine:
            row += [f"{r['bytes'] / 1e6:.2f}", f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}"]
        t.add_row(*row)
    return t


def print_table(result: dict[str, Any]) -> None:
    """The table of an eval result on stdout."""
    Console().print(format_table(result))
