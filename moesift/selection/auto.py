"""`--strategy auto`: choose the selection strategy per budget by perplexity on held-out calibration text.

No strategy wins everywhere: counting routes (frequency, weighted, contribution) and measuring what
restriction does (calibrated) trade places with the model, the workload and the budget, and spreading the
budget over layers (`--allocate`) helps at some budgets and hurts at others. `auto` measures it on the
calibration text itself, never on the evaluation data:

1. The calibration documents (`calib`, the first `calib_samples`) are shuffled with `seed` and dealt into
   `folds` folds. In each of `rounds` rounds (1 by default; `rounds=folds` is full cross-validation) one
   fold is held out for validation and the others are the fit documents.
2. On the fit documents the model is traced (with saliency) and calibrated (`moesift.calibrate`): the
   statistics every candidate ranks by. The calibration runs over all the calibration documents in one pass
   (`calibrate_split`: one capture, and per layer one set of expert computations), with the layer greedy on
   each round's fit documents' tokens and on all of them; so more rounds add a greedy each, not a pass,
   and a calibration of all the documents is at hand without a second pass.
3. Per budget, every candidate (frequency, weighted, contribution, calibrated, each with and without
   `--allocate`, as far as the budget and the traces allow) chooses its sets from the fit statistics,
   and the model restricted to each set scores the held-out documents, whole, in windows of `calib_length`
   tokens. The candidate with the lowest held-out perplexity is chosen; ties go to the cheaper candidate
   (the order above).
4. The plan is then built by the chosen candidate on all the calibration text, as the candidate was
   validated on less of it: from the given traces for a trace-scored strategy, and for `calibrated` from
   the calibration of all the calibration documents of step 2 (a given `calibration` instead), whose end-to-
   end phase, for families that have one, runs when `calibrated` is first chosen. So with one round `auto`
   costs a trace of the fit documents, one calibration pass over all the calibration documents with two
   layer greedies, where `calibrated` wins a second end-to-end phase, and per budget one forward over the
   held-out documents per distinct candidate set.

The choice, every candidate's held-out perplexity ratio to the full model, its gap in mean log-perplexity
to the chosen one with a paired standard error (the held-out documents as the units: windows of one document
are not independent), and the cost of each step are
recorded in the plan's provenance (``auto``).

Without calibration text (no `calib`, or no `model` to score it with) `auto` chooses from the traces alone:
`contribution` when every trace records saliency (``trace --saliency``), else `weighted` when they record
the applied routing weights, else `frequency`; one line on stderr says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..engines.hf import load_model, resolve_device
from ..engines.restrict import restrict
from ..formats.workload import batch_order, batches, encode_documents, read_documents
from ..record.tracer import trace as record_trace
from .calibrate import calibrate_split, data_record

AUTO = "auto"
CANDIDATES = ("frequency", "weighted", "contribution", "calibrated")
_NOTED: set[str] = set()


@dataclass
class _Round:
    """What one round fits and validates on: the fit trace and calibration, the held-out batches and the
    full model's NLL on each held-out window."""

    trace: Any
    calibration: Any
    batches: list[tuple[Any, Any]]
    full: np.ndarray  # [windows, 2]: summed NLL, scored tokens
    documents: np.ndarray  # [windows]: the held-out document of each window (batch order)
    fit_documents: int
    validation_documents: int
    seconds: dict[str, float]


@dataclass
class _Fit:
    model: Any
    rounds: list[_Round]
    settings: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    final: Callable[[Any], Any] | None = None  # the calibration of all the calibration documents (given the model)


_FITS: dict[tuple, _Fit] = {}
_KEEP = [0]  # open `keep_fits` blocks


@contextlib.contextmanager
def keep_fits() -> Any:
    """Within this block a fit keeps its loaded model between choices (a sweep plans every budget from one
    fit). Outside it the model is let go after each choice, so that `moesift.plan` does not hold a large
    model after it returns; the fit's statistics stay, and a later choice from them loads the model again."""
    _KEEP[0] += 1
    try:
        yield
    finally:
        _KEEP[0] -= 1
        if not _KEEP[0]:
            for f in _FITS.values():
                f.model = None


def forget_fits() -> None:
    """Drop every held fit: the next choice fits afresh (its trace, calibration and held-out scores)."""
    _FITS.clear()


def held_fit() -> _Fit | None:
    """The fit held now (one at a time), or None."""
    return next(iter(_FITS.values()), None)


def fit_calibration() -> Any:
    """The calibration of the fit documents of the fit held now (its first round), or None: what `auto`'s
    calibrated candidates ranked by, for scoring them elsewhere."""
    f = held_fit()
    return f.rounds[0].calibration if f is not None and f.rounds else None


def _stamp(paths: Any) -> tuple:
    """Path, size and modification time of every file behind `paths` (a model directory: its config and
    safetensors): a fit kept for the process is used again only while its inputs are unchanged."""
    out = []
    for p in map(Path, paths):
        for f in (sorted(p.glob("*.safetensors")) + [p / "config.json"]) if p.is_dir() else [p]:
            try:
                st = f.stat()
                out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((str(f), None, None))
    return tuple(out)


def trace_only_choice(bank: Any) -> str:
    """The strategy `auto` takes without calibration text: contribution when every trace records saliency,
    else weighted when every trace records the applied routing weights, else frequency."""
    if all(t.get("saliency_sum") is not None for t in bank.traces):
        return "contribution"
    if all(t.get("weight_mass") is not None for t in bank.traces):
        return "weighted"
    return "frequency"


def note_once(msg: str) -> None:
    """One line on stderr, once per process (a sweep plans several budgets)."""
    if msg not in _NOTED:
        _NOTED.add(msg)
        sys.stderr.write(f"moesift: {msg}\n")
        sys.stderr.flush()


def candidates(bank: Any, allocate: bool, allow_allocate: bool) -> list[tuple[str, bool]]:
    """(strategy, allocate) pairs `auto` compares: the trace-scored strategies the traces support, and
    calibrated; each without and with --allocate (only with it when `allocate` is asked, only without
    when the budget or --uniform excludes it)."""
    usable = ["frequency"]
    if all(t.get("weight_mass") is not None for t in bank.traces):
        usable.append("weighted")
    if all(t.get("saliency_sum") is not None for t in bank.traces):
        usable.append("contribution")
    usable.append("calibrated")
    allocs = [True] if allocate else ([False, True] if allow_allocate else [False])
    return [(s, a) for a in allocs for s in usable]


def label(strategy: str, allocate: bool) -> str:
    return strategy + ("+allocate" if allocate else "")


# ------------------------------------------------------------------------------------------------
# Fitting on the calibration folds
# ------------------------------------------------------------------------------------------------


def fit(model: Any, calib: Any, calib_samples: int | None, calib_length: int, folds: int, rounds: int, seed: int,
        device: str, dtype: str | None, progress: bool) -> _Fit:
    """The fit statistics and held-out windows of every round (kept for the process: a sweep plans many
    budgets from one fit)."""
    if folds < 2:
        raise MoesiftError(f"auto needs at least 2 folds of the calibration documents (got {folds})")
    if not 1 <= rounds <= folds:
        raise MoesiftError(f"auto rounds must be between 1 and the number of folds {folds} (got {rounds})")
    files = tuple(str(x) for x in ([calib] if isinstance(calib, (str, os.PathLike)) else calib))
    device = resolve_device(device)
    key = (str(Path(str(model)).resolve()), files, _stamp([str(model), *files]), calib_samples, calib_length, folds,
           rounds, seed, device, dtype)
    if key in _FITS:
        return _FITS[key]
    _FITS.clear()  # one model held at a time
    docs = [{k: v for k, v in d.items() if k != "source"} for d in read_documents(list(files), max_samples=calib_samples)]
    if len(docs) < folds:
        raise MoesiftError(f"auto deals the calibration documents into {folds} folds but got {len(docs)} documents; "
                           "give more calibration text")
    t0 = time.perf_counter()
    m, tok = load_model(model, device=device, dtype=dtype)
    m.eval()
    order = np.random.default_rng(seed).permutation(len(docs))
    fold_of = np.empty(len(docs), dtype=np.int64)
    fold_of[order] = np.arange(len(docs)) % folds
    out = _Fit(model=m, rounds=[], settings={
        "calibration_data": list(files), "documents": len(docs), "folds": folds, "rounds": rounds, "seed": seed,
        "max_length": calib_length, "device": device})
    out.seconds["load_s"] = time.perf_counter() - t0
    fits = [[i for i in range(len(docs)) if fold_of[i] != r] for r in range(rounds)]
    t0 = time.perf_counter()
    # one calibration pass for every round's fit documents and for all of them
    cals, out.final = calibrate_split(model, docs, fits, max_length=calib_length, device=device, dtype=dtype,
                                      loaded=(m, tok), progress=progress, data_info=data_record(list(files)))
    out.seconds["calibrate_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="moesift-auto-") as tmp:
        for r, (fit_idx, cal) in enumerate(zip(fits, cals, strict=True)):
            out.rounds.append(_fit_round(m, tok, Path(tmp) / f"fit{r}.jsonl", docs, fit_idx, cal, calib_length))
    _FITS[key] = out
    return out


def _fit_round(m: Any, tok: Any, path: Path, docs: list[dict[str, Any]], fit_idx: list[int], cal: Any,
               length: int) -> _Round:
    """Trace the fit documents `fit_idx` (`cal`: their calibration); the held-out windows and the full model's
    NLL on them."""
    fit_set = set(fit_idx)
    fit_docs = [docs[i] for i in fit_idx]
    val_docs = [d for i, d in enumerate(docs) if i not in fit_set]
    with open(path, "w", encoding="utf-8") as f:
        for d in fit_docs:
            f.write(json.dumps(d) + "\n")
    t0 = time.perf_counter()
    tr = record_trace(m, path, max_length=length, saliency=True, progress=False, tokenizer=tok, label="auto-fit",
                      folds=min(8, len(fit_docs)))
    t1 = time.perf_counter()
    wins = [(j, ids[i:i + length]) for j, ids in enumerate(encode_documents(val_docs, tok))
            for i in range(0, len(ids), length)]
    wins = [(j, w) for j, w in wins if len(w) >= 2]
    if not wins:
        raise MoesiftError("auto's held-out calibration documents tokenized to nothing; give more calibration text")
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    ws = [w for _, w in wins]
    bl = batches(ws, 8, pad_id=int(pad) if pad is not None else 0)
    doc_of = np.asarray([wins[i][0] for i in batch_order(ws)], dtype=np.int64)  # for the standard errors
    full = window_nll(m, bl)
    return _Round(trace=tr, calibration=cal, batches=bl, full=full, documents=doc_of, fit_documents=len(fit_docs),
                  validation_documents=len(val_docs),
                  seconds={"trace_s": t1 - t0, "full_s": time.perf_counter() - t1})


def window_nll(m: Any, batch_list: list[tuple[Any, Any]], resident: dict[int, list[int]] | None = None) -> np.ndarray:
    """[windows, 2]: summed next-token NLL and scored tokens of every window (batch order), under the
    restriction to `resident` ({decoder layer: ids}) when given."""
    import torch
    import torch.nn.functional as F

    dev = next(m.parameters()).device
    rows = []
    ctx = restrict(m, resident) if resident is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for ids, mask in batch_list:
            ids, mask = ids.to(dev), mask.to(dev)
            logits = m(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            tgt = ids[:, 1:]
            valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
            nll = (nll.reshape(tgt.shape) * valid).sum(dim=1, dtype=torch.float64)
            rows += list(zip(nll.cpu().tolist(), valid.sum(dim=1).cpu().tolist(), strict=True))
    return np.asarray(rows, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# The choice per budget
# ------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    """What `auto` chose: the strategy, --allocate, the calibration the plan ranks by (for calibrated: the one of
    all the calibration documents, from the fit's pass) and the record kept in the plan's provenance."""

    strategy: str
    allocate: bool
    calibration: Any
    record: dict[str, Any]


def choose(bank: Any, select: Callable[[Any, str, bool, Any], list[list[int]]], moe_layers: list[int],
           model: Any, calib: Any, allocate: bool, allow_allocate: bool, calib_samples: int | None,
           calib_length: int, folds: int, rounds: int, seed: int, device: str, dtype: str | None,
           progress: bool, make_bank: Callable[[Any], Any], final: bool = True) -> Choice:
    """The candidate with the lowest perplexity on the held-out calibration folds. `select(bank, strategy,
    allocate, calibration)` gives a candidate's resident ids per MoE layer under the plan's budget;
    `make_bank(trace)` the bank of one fit trace. Without `calib` or `model`: the trace-only choice.
    `final=False`: where calibrated wins, the plan ranks by a calibration of its own (none is finished here)."""
    if calib is None or model is None:
        s = trace_only_choice(bank)
        why = "no calibration text (--calib)" if calib is None else "no --model to score the calibration text with"
        note_once(f"auto: {why}: chose {s} from the traces alone (contribution with saliency traces, else weighted, "
                  "else frequency), without validation")
        return Choice(s, allocate, None, {"chosen": label(s, allocate), "validated": False, "reason": why})
    f = fit(model, calib, calib_samples, calib_length, folds, rounds, seed, device, dtype, progress)
    t0 = time.perf_counter()
    if f.model is None:  # let go after an earlier choice
        f.model = load_model(model, device=f.settings["device"], dtype=dtype)[0].eval()
    cal, t_final = None, None
    try:
        rows, nll, full = _validate(f, bank, select, moe_layers, allocate, allow_allocate, make_bank)
        best = min(nll, key=lambda k: nll[k].sum())  # dict order: the cheaper candidate first on ties
        if final and best.removesuffix("+allocate") == "calibrated" and f.final is not None:
            t1 = time.perf_counter()
            cal = f.final(f.model)  # all the calibration documents (its end-to-end phase on first use)
            t_final = time.perf_counter() - t1
    finally:
        if not _KEEP[0]:
            f.model = None
    # the standard errors take the held-out documents as the units: windows of one document are not independent
    doc, base = [], 0
    for r in f.rounds:
        doc.append(r.documents + base)
        base += r.validation_documents
    unit = np.concatenate(doc)
    T = full[:, 1]
    for row in rows:
        if row["strategy"] in nll:
            a, b, t = (np.bincount(unit, weights=x) for x in (nll[best], nll[row["strategy"]], T))
            row["gap"], row["se"] = paired_gap(a, b, t)
    s_best, a_best = best.removesuffix("+allocate"), best.endswith("+allocate")
    # candidates the held-out text does not tell from the chosen one (behind by at most one standard error):
    # the choice among them is a near tie that other text may reverse
    ties = [r["strategy"] for r in rows if r["strategy"] != best and "gap" in r and r["gap"] <= r["se"]]
    record = {"chosen": best, "validated": True, "candidates": rows, "ties": ties,
              "validation_windows": int(len(T)), "validation_tokens": int(T.sum()),
              "validation_units": int(len(np.unique(unit))),
              "fit_documents": [r.fit_documents for r in f.rounds],
              "validation_documents": [r.validation_documents for r in f.rounds],
              **f.settings,
              "seconds": {**f.seconds, **_round_seconds(f), "validate_s": time.perf_counter() - t0 - (t_final or 0.0)},
              "note": ("held-out perplexity of each candidate's sets chosen from the other folds, as a ratio to the "
                       "full model; gap: mean log-perplexity minus the chosen one's, se: its paired standard error "
                       "(held-out documents as units)")}
    if s_best == "calibrated":
        record["final_calibration"] = "all the calibration documents"
        if t_final is not None:
            record["seconds"]["final_calibration_s"] = t_final
    return Choice(s_best, a_best, cal, record)


def _validate(f: _Fit, bank: Any, select: Callable[[Any, str, bool, Any], list[list[int]]], moe_layers: list[int],
              allocate: bool, allow_allocate: bool,
              make_bank: Callable[[Any], Any]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], np.ndarray]:
    """(a row per candidate, each scored candidate's held-out NLL per window, the full model's [windows, 2])."""
    full = np.concatenate([r.full for r in f.rounds])
    rows: list[dict[str, Any]] = []
    nll: dict[str, np.ndarray] = {}
    scored: dict[tuple, np.ndarray] = {}  # candidates that choose the same sets are scored once
    for s, a in candidates(bank, allocate, allow_allocate):
        name = label(s, a)
        try:
            per = []
            for i, r in enumerate(f.rounds):
                res = select(make_bank(r.trace), s, a, r.calibration if s == "calibrated" else None)
                key = (i, tuple(tuple(sorted(ids)) for ids in res))
                if key not in scored:
                    scored[key] = window_nll(f.model, r.batches, {moe_layers[p]: ids for p, ids in enumerate(res)})
                per.append(scored[key])
        except MoesiftError as e:
            rows.append({"strategy": name, "skipped": str(e)})
            continue
        x = np.concatenate(per)
        nll[name] = x[:, 0]
        rows.append({"strategy": name, "ppl_ratio": math.exp((x[:, 0].sum() - full[:, 0].sum()) / full[:, 1].sum())})
    if not nll:
        why = dict.fromkeys(r["skipped"] for r in rows if "skipped" in r)  # each reason once, in order
        raise MoesiftError("auto: no candidate strategy could meet the plan: " + "; ".join(why))
    return rows, nll, full


def _round_seconds(f: _Fit) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in f.rounds:
        for k, v in r.seconds.items():
            out[k] = out.get(k, 0.0) + v
    return out


def paired_gap(a: np.ndarray, b: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """(mean log-perplexity of b minus a, token-weighted; its paired standard error, linearised ratio estimator).
    `a`, `b`: summed NLL per unit (window or document), `tokens`: the unit's scored tokens."""
    d = b - a
    T = float(tokens.sum())
    gap = float(d.sum() / T)
    n = len(d)
    se = math.sqrt(n / (n - 1) * float(((d - gap * tokens) ** 2).sum())) / T if n > 1 else float("nan")
    return gap, se


def format_choice(record: dict[str, Any]) -> list[str]:
    """Lines about an `auto` choice for `format_plan`."""
    if not record.get("validated"):
        return [f"  auto: chose {record['chosen']} from the traces alone ({record.get('reason')})"]
    docs = f" of {record['validation_units']} documents" if "validation_units" in record else ""
    lines = [f"  auto: chose {record['chosen']} by held-out perplexity on {record['validation_windows']} windows "
             f"({record['validation_tokens']} tokens){docs} of the calibration text:"]
    for r in record["candidates"]:
        if "skipped" in r:
            lines.append(f"    {r['strategy']:<24} skipped: {r['skipped']}")
        else:
            lines.append(f"    {r['strategy']:<24} x{r['ppl_ratio']:.4f}  gap {r['gap']:+.5f} (se {r['se']:.5f})")
    if record.get("ties"):
        lines.append(f"  auto: near tie, within one standard error on the held-out text (other text may reverse it): "
                     f"{', '.join(record['ties'])}")
    if record.get("final_calibration"):
        lines.append(f"  auto: the plan ranks by the calibration of {record['final_calibration']}")
    return lines
