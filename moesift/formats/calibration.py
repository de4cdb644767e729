"""Calibration files (`moesift-calibration/1`, JSON): per MoE layer, the greedy removal order and the measured
layer-output error of each kept count, optional equal-count orders for group-limited routers, and end-to-end
sets; validated on read so a damaged or foreign file is one error line."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..core.io import write_json
from ..core.values import is_int
from .plan import resident_ids

SCHEMA = "moesift-calibration/1"


@dataclass
class Calibration:
    """Per MoE layer: the selection units (expert id lists) in removal order, and the layer's relative
    output error after each removal (``error[0]`` = 0: nothing removed). Units never removed (the top-k
    floor) follow in ``floor``. Hash-routed layers have ``order`` None (kept whole). Group-limited layers
    also hold ``equal``: the same for single experts removed in rounds of one per group (``groups``: the
    group count), with ``kl`` / ``alone`` per kept number of rounds from the end-to-end phase."""

    model: dict[str, Any]
    layers: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "model": self.model, "layers": self.layers, "settings": self.settings,
                "timing": self.timing}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "calibration") -> Calibration:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA or not isinstance(d.get("layers"), list):
            raise MoesiftError(f"{source!r} is not a {SCHEMA} file; make one with `moesift calibrate`")
        for key in ("model", "settings", "timing"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise MoesiftError(f"{source!r}: {key!r} must be an object")
        model = dict(d.get("model") or {})
        n = model.get("n_experts")
        if n is not None and (not is_int(n) or n < 1):
            raise MoesiftError(f"{source!r}: model.n_experts must be a positive integer")
        for i, e in enumerate(d["layers"]):
            check_layer(e, n, f"{source!r}: layers[{i}]")
        return cls(model=model, layers=list(d["layers"]), settings=dict(d.get("settings") or {}),
                   timing=dict(d.get("timing") or {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        p = Path(path)
        if not p.is_file():
            raise MoesiftError(f"calibration file {str(p)!r} not found")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoesiftError(f"{str(p)!r} is not a JSON calibration file ({SCHEMA})") from None
        if not isinstance(d, dict):
            raise MoesiftError(f"{str(p)!r} is not a JSON calibration file ({SCHEMA})")
        return cls.from_dict(d, str(p))

    def save(self, path: str | os.PathLike, force: bool = True, inputs: Iterable[str | os.PathLike] = ()) -> Path:
        """Write the calibration as JSON atomically; `inputs`: files it must not replace."""
        return write_json(path, self.to_dict(), force=force, inputs=inputs)

    @staticmethod
    def entry(e: dict[str, Any], mode: str = "whole") -> dict[str, Any]:
        """The removal order of layer entry `e` for a group mode: "whole" (whole groups, or single experts
        for routers without groups) or "equal" (single experts, the same number from every group)."""
        if mode != "equal":
            return e
        if not e.get("equal"):
            raise MoesiftError(f"the calibration has no equal-count order for MoE layer {e.get('layer')} (its "
                               "router has no groups, or moesift calibrate predates --groups equal); calibrate again, or plan "
                               "with --groups whole")
        return e["equal"]

    def scores(self, n_experts: int, mode: str = "whole") -> np.ndarray:
        """[L, E] float64: higher = removed later (more needed). Experts of the floor score highest; within a
        unit every expert gets the unit's score divided by the unit size (group sums order the groups).
        `mode="equal"`: from the order that removes one expert of every group per round."""
        L = len(self.layers)
        out = np.zeros((L, n_experts))
        for p, e in enumerate(self.layers):
            if e.get("order") is None:
                out[p] = 1.0
                continue
            e = self.entry(e, mode)
            units = list(e["order"]) + list(e["floor"])
            for r, u in enumerate(units):
                for x in u:
                    out[p, int(x)] = (r + 1) / len(u)
        return out

    def end_to_end_set(self, p: int, n_experts: int, mode: str = "whole") -> list[int] | None:
        """The resident ids of MoE layer `p` chosen end to end for a set of `n_experts` experts (None where
        the calibration did not choose one: layer-error order applies). `mode`: whole groups, or the same
        count in every group ("equal")."""
        e2e = self.layers[p].get("e2e") if mode != "equal" else self.layers[p].get("equal")
        if not e2e or not e2e.get("sets"):
            return None
        for ids in e2e["sets"].values():
            if len(ids) == n_experts:
                return [int(x) for x in ids]
        return None

    def uniform_kl(self, mode: str, n_experts: int, experts: int) -> float | None:
        """The calibration KL of the model with every MoE layer keeping `n_experts` of `experts` the way
        `mode` keeps them (the sets picked end to end, for either layout); None when the
        calibration did not measure it (no end-to-end phase, or a count the mode cannot keep)."""
        live = [e for e in self.layers if e.get("order") is not None]
        if not live:
            return None
        if n_experts >= experts:
            return 0.0
        if mode == "equal":
            q = live[0].get("equal") or {}
            G = int(q.get("groups") or 0)
            kl = q.get("kl") or {}
            return float(kl[str(n_experts // G)]) if G and n_experts % G == 0 and str(n_experts // G) in kl else None
        e2e = live[0].get("e2e") or {}
        for k, ids in (e2e.get("sets") or {}).items():
            if len(ids) == n_experts:
                return float(e2e["kl"][k])
        return None

    def floor_units(self, mode: str = "whole") -> list[int]:
        """Per layer, the plan units the calibration never removed (for "equal": rounds of one expert per
        group)."""
        out = []
        for e in self.layers:
            if e.get("order") is None:
                out.append(0)
            elif mode == "equal":
                q = self.entry(e, mode)
                out.append(len(q["floor"]) // int(q["groups"]))
            else:
                out.append(len(e["floor"]))
        return out

    def unit_gains(self, mode: str = "whole") -> list[list[float] | None]:
        """Per layer, in keep order (best unit first): the relative error each unit saves when kept, for the
        units beyond the floor (None for hash-routed layers). For "equal" a unit is a round that removes one
        expert of every group."""
        out: list[list[float] | None] = []
        for e in self.layers:
            if e.get("order") is None:
                out.append(None)
                continue
            if mode == "equal" and self.entry(e, mode).get("alone"):  # KL of the layer alone at r rounds
                out.append(_drops(self.entry(e, mode)["alone"]))  # the round that takes r to r + 1
                continue
            if mode == "equal":
                q = self.entry(e, mode)
                G, err = int(q["groups"]), [float(x) for x in q["error"]]
                rounds = (len(err) - 1) // G
                gains = [max(err[G * (j + 1)] - err[G * j], 0.0) for j in range(rounds)]
                out.append(list(reversed(gains)))
                continue
            if e.get("e2e"):  # KL of the layer alone restricted to its end-to-end set of k units
                out.append(_drops(e["e2e"]["alone"]))  # the unit that takes k to k + 1
                continue
            err = [float(x) for x in e["error"]]  # err[s] after s removals
            gains = [max(err[s + 1] - err[s], 0.0) for s in range(len(err) - 1)]  # unit removed at step s
            out.append(list(reversed(gains)))  # the last removed is kept first
        return out


def _drops(alone: dict[str, float]) -> list[float]:
    """{kept count: KL of the layer alone} -> what each step from one kept count to the next saves, in
    increasing count order."""
    a = {int(k): float(v) for k, v in alone.items()}
    ks = sorted(a)
    return [max(a[k] - a[j], 0.0) for k, j in zip(ks, ks[1:], strict=False)]


def check_layer(e: Any, n_experts: int | None, where: str) -> None:
    """One layer entry of a calibration file: refuse what would break a plan later (a file is user input)."""
    if not isinstance(e, dict):
        raise MoesiftError(f"{where} must be an object")
    if e.get("layer") is not None and (not is_int(e["layer"]) or e["layer"] < 0):
        raise MoesiftError(f"{where}.layer must be a decoder layer index")
    if e.get("order") is None:
        return
    _check_order(e, n_experts, where)
    if e.get("equal") is not None:
        q = e["equal"]
        if not isinstance(q, dict):
            raise MoesiftError(f"{where}.equal must be an object")
        _check_order(q, n_experts, f"{where}.equal")
        g = q.get("groups")
        if not is_int(g) or g < 1 or len(q["floor"]) % g or (len(q["error"]) - 1) % g:
            raise MoesiftError(f"{where}.equal.groups must divide the floor and the removals")
        for key in ("kl", "alone"):
            _check_levels(q.get(key), f"{where}.equal.{key}")
        _check_sets(q.get("sets"), n_experts, f"{where}.equal.sets")
    if e.get("e2e") is not None:
        x = e["e2e"]
        if not isinstance(x, dict) or not isinstance(x.get("sets"), dict):
            raise MoesiftError(f"{where}.e2e must be an object with sets")
        _check_sets(x["sets"], n_experts, f"{where}.e2e.sets")
        for key in ("kl", "alone"):
            _check_levels(x.get(key), f"{where}.e2e.{key}")


def _check_sets(sets: Any, n_experts: int | None, where: str) -> None:
    if sets is None:
        return
    if not isinstance(sets, dict):
        raise MoesiftError(f"{where} must map kept counts to expert-id lists")
    for k, ids in sets.items():
        if not str(k).isdigit() or not isinstance(ids, list):
            raise MoesiftError(f"{where}[{k!r}] must be a list of distinct expert ids")
        resident_ids(f"{where}[{k!r}]", ids, n_experts)


def _check_order(e: dict[str, Any], n_experts: int | None, where: str) -> None:
    order, floor, err = e.get("order"), e.get("floor"), e.get("error")
    if not isinstance(order, list) or not isinstance(floor, list) or not isinstance(err, list):
        raise MoesiftError(f"{where} needs order, floor and error lists")
    units = order + floor
    for i, u in enumerate(units):
        if not isinstance(u, list) or not u:
            raise MoesiftError(f"{where}: order and floor must be lists of expert-id lists")
        resident_ids(f"{where}: unit {i}", u, n_experts)
    flat = [x for u in units for x in u]
    if len(set(flat)) != len(flat):
        raise MoesiftError(f"{where}: an expert appears twice in order and floor")
    if len(err) != len(order) + 1 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) and v >= 0 for v in err):
        raise MoesiftError(f"{where}: error must hold len(order) + 1 finite non-negative numbers")


def _check_levels(v: Any, where: str) -> None:
    if v is None:
        return
    if not isinstance(v, dict) or not all(str(k).isdigit() and isinstance(x, (int, float)) and not isinstance(x, bool)
                                          and math.isfinite(x) for k, x in v.items()):
        raise MoesiftError(f"{where} must map kept counts to finite numbers")
