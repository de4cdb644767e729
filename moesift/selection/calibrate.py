"""Calibrated selection: measure what restriction does to each MoE layer's output on calibration prompts.

Two phases, so that a model that does not fit in memory can be calibrated:

1. Capture. The model runs the calibration prompts once (``device="spread"`` lets accelerate spread or
   offload it); a hook on every MoE block stores the block's input hidden states (the tokens of the
   prompts, padding left out) on the host.
2. Layer by layer. Each MoE block alone is built on the meta device and filled from the checkpoint (only
   the tensors of that decoder layer are read, through transformers' own name conversions), evaluated on
   its captured inputs, and freed before the next one.

Per layer, greedy removal: starting from every expert resident, remove the selection unit (an expert, or a
whole group for group-limited routers) whose removal raises the layer's output error
``sum_t ||y_full(x_t) - y_R(x_t)||^2`` least, where ``y_R`` is the block restricted to the resident set R
(the family's own restriction: the token is re-routed to its next-best resident experts), until only the
top-k floor is left. The order of removal ranks the units (removed last = most needed) and the error
after each removal gives the marginal loss of each unit, which ``plan --allocate`` spends a total budget by.

The greedy is lazy (as in CELF): every candidate is measured on the first step, so the first removal is
exact; afterwards a candidate is re-measured only when the tokens it serves changed and it reaches the top
of the queue (a removal that gets cheaper as others go is the exception it can miss).

A candidate is measured without running the block (`moesift.selection.calib_cache`): every expert runs on
every calibration token once and each token keeps the Gram matrix of its experts' outputs; a restriction is
re-routed over the router's recorded logits as the family's router does it, and its error is a quadratic
form in the changed weights. That the re-routing reproduces the block is checked per layer against
restricted block forwards; a layer where it does not (or whose Gram matrices exceed the cache bound) runs
the block for every candidate, as `SCORER = "block"` does everywhere (`moesift.selection.calib_greedy`).

Only the tokens an expert currently serves change when it is removed, for routers whose weights are
renormalised over the selection (or do not depend on the other experts); for those, a candidate's error is
measured on its tokens alone, which is exact. Whether a router is such is measured, not assumed: on the
first step one removal is evaluated on every token, and when another token's output moved the layer is
calibrated on every token for every candidate. Where the router keeps the other tokens' experts and only
scales their weights (softmax over the resident experts without renormalising the top-k: OLMoE,
Qwen2-MoE), the other tokens' errors are a closed form of the scale, and only each candidate's own tokens
are re-routed (`calib_greedy._Rescaled`; used where the first removal, measured on every token, agrees:
with float32 weights, not where the family rounds them to bfloat16).
Group-limited layers (a handful of groups) are always evaluated on every token.

Group-limited layers get a second order, for plans that keep the same number of experts in every group
(``plan --groups equal``: the budgets below the whole-group floor): single experts removed in rounds that
take one expert from every group (the cheapest first within a round), down to the fewest per group the
router can use (the group score's terms, and top-k within the selectable groups). It is stored as the
layer's ``equal`` entry; the set left after any whole number of rounds has the same count in every group.
The end-to-end phase (3.) then picks, per kept number of rounds, between the greedy's set and each group's
most routed experts, by the model's KL.

3. End to end, where the layer error misleads. A group-limited router (DeepSeek-V3: 2 of 4 groups per
   token) leaves each layer a choice among a handful of group sets per kept count (C(4, 2) = 6), and the set
   with the least layer-output error is not always the one that costs the model least. For such layers each
   set is scored by the whole model's KL to the full model's next-token distributions on the calibration
   tokens, layer by layer with the other layers' sets fixed (coordinate descent until a sweep changes
   nothing), per kept count; ``plan`` takes those sets and ``--allocate`` spends by the KL each layer's set
   costs alone. This needs the whole model (held, or offloaded with ``device="spread"``) for the run, one
   forward per candidate; routers with one expert per unit (too many sets) keep the layer error
   (`choose_end_to_end`, in `moesift.selection.endtoend`).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from ..arch.spec import equal_group_floor
from ..core.errors import MoesiftError
from ..core.io import check_output_path, input_paths, sha256_file
from ..core.progress import progress_bar
from ..engines.hf import config_obj, hf_progress, load_model, model_class, parse_dtype, resolve_device
from ..formats.calibration import Calibration
from ..formats.checkpoint import CheckpointIndex
from ..formats.workload import batch_order, batches, encode_documents, read_documents
from .calib_cache import BlockRunner, SubsetScorer, make_scorer
from .calib_greedy import greedy_layer
from .endtoend import choose_end_to_end

# how the greedy scores a candidate restriction: "cache" (every expert run on every calibration token once,
# restrictions re-routed over the router's logits; `moesift.selection.calib_cache`) or "block" (the block
# run under every candidate restriction: the reference the cache is checked against)
SCORER = "cache"

# ------------------------------------------------------------------------------------------------
# Phase 1: capture each MoE block's inputs
# ------------------------------------------------------------------------------------------------


def capture_inputs(model: Any, adapter: Any, spec: Any, token_lists: list[list[int]], batch_size: int = 8,
                   dtype: Any = None, progress: Any = None) -> dict[int, Any]:
    """{decoder layer: hidden [N, H] on the host}: the inputs of every MoE block on the tokens (no padding)."""
    import torch

    store: dict[int, list[Any]] = {layer: [] for layer in spec.moe_layers}
    state: dict[str, Any] = {}
    handles = []
    for layer in spec.moe_layers:
        block = adapter.moe_block(model, layer)

        def pre(mod, args, kwargs, _layer=layer):
            h = args[0] if args else kwargs.get("hidden_states")
            flat = h.reshape(-1, h.shape[-1])
            keep = state["mask"].to(flat.device)
            store[_layer].append(flat[keep].to("cpu", dtype=dtype or flat.dtype))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    bl = batches(token_lists, batch_size)
    task = progress.add_task("capturing MoE inputs", total=len(bl)) if progress else None
    try:
        with torch.no_grad():
            for ids, mask in bl:
                state["mask"] = mask.reshape(-1).bool()
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                if progress:
                    progress.update(task, advance=1)
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(v) for layer, v in store.items()}


# ------------------------------------------------------------------------------------------------
# Phase 2: one MoE block at a time from the checkpoint
# ------------------------------------------------------------------------------------------------


def skeleton(config_dict: dict[str, Any]) -> Any:
    """The family's causal-LM model on the meta device (no memory): a frame to load single blocks into."""
    import torch

    cfg = config_obj(config_dict)
    with torch.device("meta"):
        return model_class(cfg)(cfg)


def load_block(index: Any, frame: Any, layer: int, device: str = "cpu", dtype: Any = None) -> Any:
    """Fill decoder layer `layer`'s MoE block of the meta `frame` from the checkpoint (only that layer's
    tensors are read) on `device`; returns the block. `unload_block` gives the memory back."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    ad = index.adapter
    block = ad.moe_block(frame, layer)
    block.to_empty(device=device)
    names: dict[str, list[str]] = {}
    for t in index.tensors:
        if t.role.layer == layer and t.role.kind != "other":
            names.setdefault(t.file, []).append(t.name)
    state: dict[str, Any] = {}
    for f, ns in names.items():
        with safe_open(str(Path(index.directory) / f), "pt", device="cpu") as fh:
            for n in ns:
                x = fh.get_tensor(n)
                state[n] = x.to(dtype) if dtype is not None and x.is_floating_point() else x
    prefix = next(n for n, m in frame.named_modules() if m is block) + "."
    cfg = LoadStateDictConfig(dtype=dtype, weight_mapping=get_model_conversion_mapping(frame))
    with hf_progress(False):
        info = convert_and_load_state_dict_in_model(frame, state, cfg)
    info = info[0] if isinstance(info, tuple) else info
    missing = [k for k in getattr(info, "missing_keys", ()) if k.startswith(prefix)]
    if missing:
        raise MoesiftError(
            f"{str(index.directory)!r}: the checkpoint has no tensor for {missing[0]} (MoE block of layer {layer}); "
            "the checkpoint is incomplete"
        )
    # buffers that the checkpoint does not hold (none in the supported families) would be uninitialised
    for n, b in block.named_buffers():
        if not torch.isfinite(b).all() and b.is_floating_point() and (prefix + n) not in state:
            raise MoesiftError(f"{str(index.directory)!r}: buffer {prefix + n} of layer {layer} is not in the checkpoint")
    return block.to(device=device, dtype=dtype) if dtype is not None else block.to(device)


def unload_block(frame: Any, adapter: Any, layer: int) -> None:
    adapter.moe_block(frame, layer).to("meta")


def units_of(spec: Any) -> list[list[int]]:
    """Selection units: experts, or whole groups for group-limited routers (as the planner keeps them)."""
    if spec.n_group and spec.n_group > 1:
        per = spec.n_experts // spec.n_group
        return [list(range(g * per, (g + 1) * per)) for g in range(spec.n_group)]
    return [[e] for e in range(spec.n_experts)]


def floor_units(spec: Any, units: list[list[int]]) -> int:
    """Fewest units a layer can keep: enough for top-k experts (and top-k groups)."""
    per = len(units[0])
    n = math.ceil(spec.top_k / per)
    if spec.n_group and spec.n_group > 1 and spec.topk_group:
        n = max(n, int(spec.topk_group))
    return min(n, len(units))


# ------------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------------


def calibrate(
    model: str | os.PathLike,
    data: str | os.PathLike | list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    max_samples: int | None = 64,
    max_length: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str | None = None,
    field: str | None = None,
    force: bool = False,
    progress: bool = True,
    loaded: Any = None,
    end_to_end: bool = True,
    kl_top: int = 64,
    end_to_end_samples: int | None = None,
    end_to_end_loss: str = "kl",
) -> Calibration:
    """Measure, layer by layer, how much each MoE layer's output moves when its experts are removed one
    unit at a time (greedy, least damage first) on the calibration prompts `data` (a workload file; never
    the evaluation data). `model` is the checkpoint directory; `loaded=(model, tokenizer)` reuses an
    already loaded model for the capture phase. Saved to `out` when given.

    `end_to_end`: where a layer chooses among few sets (group-limited routers), choose them by the model's
    own KL to the full model on the calibration tokens (see `choose_end_to_end`; `kl_top` most likely tokens kept
    per position; the first `end_to_end_samples` calibration documents, each candidate costing a forward of
    the model on them). That needs the whole model through the calibration (offloaded with device="spread" when it
    does not fit); with `end_to_end=False`, or for routers with one expert per unit, the layer error alone
    decides. Group-limited layers also get the order for plans keeping the same number of experts in every
    group (``equal``), and in the end-to-end phase its KL per kept number of rounds."""
    device = resolve_device(device)
    _check_settings(kl_top, end_to_end_loss, max_length)
    if out is not None:
        check_output_path(out, force, inputs=input_paths(data))
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    docs = read_documents(paths, field=field, max_samples=max_samples)
    opts = _Options(max_samples, max_length, batch_size, device, dtype, end_to_end, kl_top, end_to_end_samples,
                    end_to_end_loss)
    with progress_bar(progress, remaining=True) as bar:
        cal = _calibrate_docs(model, docs, {"all": None}, data_record(paths), opts, loaded, bar, defer=False)[0]["all"]
    if out is not None:
        cal.save(out, force=force, inputs=input_paths(data))
    return cal


def calibrate_split(model: str | os.PathLike, docs: list[dict[str, Any]], fits: Sequence[Sequence[int]],
                    max_length: int = 256, batch_size: int = 8, device: str = "auto", dtype: str | None = None,
                    loaded: Any = None, progress: bool = False, data_info: list[dict[str, Any]] | None = None,
                    ) -> tuple[list[Calibration], Callable[[Any], Calibration]]:
    """The calibrations of each set of documents in `fits` (indices into `docs`) and of all of `docs`, from one
    pass: one capture of the MoE inputs and, per layer, one scorer (Gram matrices or block) over every token,
    with the greedy run on each set's tokens and on all of them. Returns the calibration of each set, whole,
    and a function that gives the calibration of all the documents: its layer greedy ran in the pass, and its
    end-to-end phase (where the family has one) runs on the first call, with the loaded model given to it
    (the model is not held in between). Each is what `calibrate` gives on those documents, up to the
    rounding of the batches the tokens were computed in."""
    opts = _Options(None, max_length, batch_size, resolve_device(device), dtype)
    _check_settings(opts.kl_top, opts.end_to_end_loss, max_length)
    names = [f"round {r + 1} fit" for r in range(len(fits))]
    with progress_bar(progress, remaining=True) as bar:
        subsets: dict[str, list[int] | None] = {**{n: list(f) for n, f in zip(names, fits, strict=True)},
                                                "all": None}
        ready, pending = _calibrate_docs(model, docs, subsets, data_info or [], opts, loaded, bar, defer=True)
    done: dict[str, Calibration] = {}

    def final(m: Any) -> Calibration:
        if "all" not in done:
            with progress_bar(progress, remaining=True) as b:
                done["all"] = pending["all"](m, b)
        return done["all"]

    return [ready[n] for n in names], final


def data_record(paths: list[Any]) -> list[dict[str, Any]]:
    """What a calibration records of its data files: each path and its sha256 (None for a non-file)."""
    return [{"path": str(q), "sha256": sha256_file(q) if Path(q).is_file() else None} for q in paths]


@dataclass
class _Options:
    max_samples: int | None
    max_length: int
    batch_size: int
    device: str
    dtype: str | None
    end_to_end: bool = True
    kl_top: int = 64
    end_to_end_samples: int | None = None
    end_to_end_loss: str = "kl"


def _calibrate_docs(model: Any, docs: list[dict[str, Any]], subsets: dict[str, list[int] | None],
                    data_info: list[dict[str, Any]], o: _Options, loaded: Any, bar: Any,
                    defer: bool) -> tuple[dict[str, Calibration], dict[str, Callable[[Any, Any], Calibration]]]:
    """({subset name: its Calibration}, {subset name: a function finishing its Calibration}): `subsets` maps
    a name to document indices (None: every document). One capture over all the documents, one scorer per
    layer, a greedy per subset. The end-to-end phase runs in this call, except with `defer` for the subsets
    over every document: those are pending, and their function takes the loaded model and a progress bar."""
    index = CheckpointIndex.build(model)
    index.check_consistent()
    spec = index.spec
    t0 = time.perf_counter()
    if loaded is not None:
        m, tok = loaded
    else:
        with hf_progress(False):
            m, tok = load_model(model, device=o.device, dtype=o.dtype)
    enc = [ids[:o.max_length] for ids in encode_documents(docs, tok)]
    kept = [i for i, t in enumerate(enc) if t]  # documents that tokenized to something
    toks = [enc[i] for i in kept]
    if not toks:
        where = data_info[0]["path"] if data_info else "the calibration documents"
        raise MoesiftError(f"calibration data {where!s} tokenized to nothing; give a file with text")
    work_dtype = next(m.parameters()).dtype
    inputs = capture_inputs(m, index.adapter, spec, toks, batch_size=o.batch_size, progress=bar)
    t_capture = time.perf_counter() - t0
    rows, docs_of = _subset_rows(toks, kept, subsets)
    units = units_of(spec)
    n_floor = floor_units(spec, units)
    e2e_wanted = o.end_to_end and len(units[0]) > 1 and len(units) > n_floor
    if loaded is None and not e2e_wanted:
        del m
        m = None
    run_dev = resolve_device("auto" if o.device == "spread" else o.device)
    equal = equal_units(spec, index.adapter)
    per_subset = _calibrate_layers(index, inputs, units, n_floor, equal, run_dev, work_dtype, bar, rows)
    info = {k: v for k, v in spec.to_dict().items()} if hasattr(spec, "to_dict") else {}
    info["checkpoint"] = str(index.directory)
    shared_s = time.perf_counter() - t0

    def finish(name: str, model_now: Any, b: Any) -> Calibration:
        t1 = time.perf_counter()
        layers_out, per_layer_s = per_subset[name]
        sub_toks = [toks[j] for j in docs_of[name]]
        e2e = None
        if e2e_wanted:
            if model_now is None:
                raise MoesiftError("the end-to-end phase of this calibration needs the loaded model")
            e2e_toks = sub_toks[:o.end_to_end_samples] if o.end_to_end_samples else sub_toks
            e2e = _end_to_end(model_now, spec, layers_out, units, n_floor, equal[0], e2e_toks, o.batch_size,
                              o.kl_top, o.end_to_end_loss, b)
            if e2e is not None:
                per_layer_s = [e["seconds"] for e in layers_out if e.get("order") is not None]
        settings = {"data": data_info, "max_samples": o.max_samples, "max_length": o.max_length,
                    "documents": len(sub_toks), "tokens": int(sum(len(t) for t in sub_toks)), "device": run_dev,
                    "end_to_end": e2e,
                    "dtype": str(parse_dtype(o.dtype)).replace("torch.", "") if o.dtype
                    else str(work_dtype).replace("torch.", "")}
        if subsets[name] is not None:
            settings["subset"] = {"documents": [int(kept[j]) for j in docs_of[name]], "of": len(docs)}
        timing = {"capture_s": t_capture, "per_layer_s": per_layer_s,
                  "end_to_end_s": e2e["seconds"] if e2e else None,
                  "mean_layer_s": float(np.mean(per_layer_s)) if per_layer_s else None,
                  "total_s": shared_s + time.perf_counter() - t1}
        return Calibration(model=info, layers=layers_out, settings=settings, timing=timing)

    ready = {name: finish(name, m, bar) for name, sel in subsets.items() if not (defer and sel is None)}
    pending = {name: functools.partial(finish, name) for name in subsets if name not in ready}
    del m
    return ready, pending


def _subset_rows(toks: list[list[int]], kept: list[int],
                 subsets: dict[str, list[int] | None]) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Per subset: the rows of its tokens among the captured ones (None: all) and its positions in `toks`.
    `capture_inputs` stores the tokens batch by batch in the order of `batches` (`batch_order`)."""
    import torch

    order = batch_order(toks)
    doc_of_row = np.repeat(np.asarray(order, dtype=np.int64), [len(toks[i]) for i in order])
    pos = {d: j for j, d in enumerate(kept)}
    rows: dict[str, Any] = {}
    docs_of: dict[str, list[int]] = {}
    for name, sel in subsets.items():
        if sel is None:
            rows[name], docs_of[name] = None, list(range(len(toks)))
            continue
        js = sorted(pos[d] for d in set(sel) if d in pos)
        if not js:
            raise MoesiftError(f"the {name} documents of the calibration tokenized to nothing; give more text")
        rows[name] = torch.from_numpy(np.flatnonzero(np.isin(doc_of_row, js)))
        docs_of[name] = js
    return rows, docs_of


def _check_settings(kl_top: int, end_to_end_loss: str, max_length: int) -> None:
    """Refuse settings calibration cannot run with."""
    if kl_top < 1:
        raise MoesiftError(f"--kl-top must be at least 1 (got {kl_top})")
    if end_to_end_loss not in ("kl", "nll"):
        raise MoesiftError(f"unknown end-to-end loss {end_to_end_loss!r}: kl or nll")
    if max_length < 2:
        raise MoesiftError(f"--calib-length must be at least 2 (got {max_length})")


def equal_units(spec: Any, ad: Any) -> tuple[int, list[list[int]], list[int]]:
    """Group-limited routers: (fewest experts kept in all when every group keeps the same number, single
    experts as units, the group of each); (0, [], []) for other routers."""
    if not (spec.n_group and spec.n_group > 1):
        return 0, [], []
    eq_floor = spec.n_group * equal_group_floor(spec.n_experts, spec.n_group, spec.topk_group, spec.top_k,
                                                ad.group_score_top)
    per = spec.n_experts // spec.n_group
    return eq_floor, [[e] for e in range(spec.n_experts)], [e // per for e in range(spec.n_experts)]


def _calibrate_layers(index: Any, inputs: dict[int, Any], units: list[list[int]], n_floor: int,
                      equal: tuple[int, list[list[int]], list[int]], run_dev: str, work_dtype: Any,
                      bar: Any, rows: dict[str, Any]) -> dict[str, tuple[list[dict[str, Any]], list[float]]]:
    """Per subset of the captured tokens (`rows`: name -> row indices, None for all): (one calibration entry
    per MoE layer, seconds per calibrated layer). Each block is loaded alone from the checkpoint, its scorer
    built once on its captured inputs (popped from `inputs`), the greedy run for every subset, and the block
    freed. A subset's seconds are the shared ones (load, scorer) plus its own greedy."""
    import torch

    spec, ad = index.spec, index.adapter
    frame = skeleton(index.config)
    # group-limited routers: also the order for plans that keep the same number in every group
    eq_floor, eq_units, eq_balance = equal
    out: dict[str, tuple[list[dict[str, Any]], list[float]]] = {name: ([], []) for name in rows}
    steps = sum(0 if layer in spec.hash_layers else len(units) - n_floor + (spec.n_experts - eq_floor if eq_floor
                else 0) for layer in spec.moe_layers) * len(rows)
    task = bar.add_task("calibrating", total=steps)
    for p, layer in enumerate(spec.moe_layers):
        if layer in spec.hash_layers:
            for layers_out, _ in out.values():
                layers_out.append({"layer": layer, "moe_index": p, "order": None, "floor": None, "error": None,
                                   "note": "hash-routed: kept whole"})
            continue
        bar.update(task, description=f"calibrating layer {layer} ({p + 1}/{len(spec.moe_layers)})")
        ts = time.perf_counter()
        load_block(index, frame, layer, device=run_dev, dtype=work_dtype)
        blk = BlockRunner(frame, ad, spec, layer)
        x = inputs.pop(layer).to(run_dev, dtype=work_dtype)
        whole = make_scorer(blk, x, SCORER)  # one per layer, for both orders and every subset
        built = whole.forwards  # the block forwards that built and checked it
        shared = time.perf_counter() - ts
        for name, sel in rows.items():
            tg = time.perf_counter()
            sc = whole if sel is None else SubsetScorer(whole, sel)
            r = greedy_layer(blk, x, units, n_floor, tick=lambda: bar.update(task, advance=1), scorer=sc)
            r["forwards"] += built
            if eq_floor:
                q = greedy_layer(blk, x, eq_units, eq_floor, tick=lambda: bar.update(task, advance=1),
                                 balance=eq_balance, scorer=sc)
                r["equal"] = {**{k: q[k] for k in ("order", "floor", "error", "forwards")}, "groups": spec.n_group}
            if run_dev.startswith("cuda"):
                torch.cuda.synchronize()
            dt = shared + time.perf_counter() - tg
            out[name][1].append(dt)
            out[name][0].append({"layer": layer, "moe_index": p, **r, "seconds": dt})
        unload_block(frame, ad, layer)
        del x, whole, sc
    return out


def _end_to_end(m: Any, spec: Any, layers_out: list[dict[str, Any]], units: list[list[int]], n_floor: int,
                eq_floor: int, toks: list[list[int]], batch_size: int, kl_top: int, loss: str,
                bar: Any) -> dict[str, Any] | None:
    """The end-to-end phase (`choose_end_to_end`) with its progress bar; its seconds are spread over the
    layers it served."""
    live = sum(1 for layer in spec.moe_layers if layer not in spec.hash_layers)
    per_g = len(units[0])
    t2 = bar.add_task("end-to-end choice", total=live * (len(units) - n_floor) * 2
                      + (live * (per_g - eq_floor // spec.n_group) if eq_floor else 0))
    e2e = choose_end_to_end(m, spec, layers_out, units, n_floor, toks, batch_size=batch_size, top=kl_top,
                            loss=loss, tick=lambda: bar.update(t2, advance=1))
    if e2e is not None:  # spread its cost over the layers it served
        for e in layers_out:
            if "e2e" in e:
                e["seconds"] += e2e["seconds"] / max(live, 1)
    return e2e


def format_calibration(c: Calibration, out: Any) -> str:
    """What `moesift calibrate` prints: where the calibration was written, its size and its timings."""
    t = c.timing
    return (f"wrote {out}: {len(c.layers)} MoE layers, {c.settings['tokens']} calibration tokens; capture "
            f"{t['capture_s']:.1f} s, {t['mean_layer_s'] or 0:.2f} s per layer, {t['total_s']:.1f} s in all")
