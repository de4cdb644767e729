"""mlx-lm model folders (what `mlx_lm.convert` writes, quantized or not) run in mlx-lm: recognise such a folder,
load it with mlx-lm's own loader, and restrict the routing of a loaded model to resident experts with the
masking of the transformers restriction (the router logits of every other expert are -inf before the family's
scoring and top-k, and so is its selection bias where the family has one), so that an MLX model and its trim
are compared on the same kernels and the same stored bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..arch.spec import get_path
from ..core.errors import MoesiftError
from ..core.identity import load_config_dict
from ..formats.checkpoint import CheckpointIndex
from ..formats.trimmed import mlx_layout
from .mlx import MlxRunner, mlx_version, module_for
from .mlx_record import recordable_model_types, router_logits


def is_mlx_model(path: str | Path) -> bool:
    """True when `path` is an mlx-lm model folder of a supported family (its config carries mlx-lm's
    "quantization" entry, or its experts are stored as mlx-lm's stacked tensors); never raises."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        return mlx_layout(CheckpointIndex.build(p))
    except MoesiftError:  # damaged or unsupported folders: the config says it when it can
        try:
            return isinstance(load_config_dict(p).get("quantization"), dict)
        except MoesiftError:
            return False


def quantization_note(config: Mapping[str, Any]) -> str:
    """How the weights of an mlx-lm model folder are stored, in words."""
    q = config.get("quantization")
    if not isinstance(q, Mapping):
        return "unquantized weights"
    mode = q.get("mode", "affine")
    return f"{q.get('bits')}-bit {mode} quantized weights (group size {q.get('group_size')})"


def check_runnable(index: CheckpointIndex) -> None:
    """One error line when mlx-lm cannot build the family of `index` (no implementation, or a config its
    implementation cannot read)."""
    spec = index.spec
    if module_for(spec.model_type) is None:
        raise MoesiftError(f"mlx-lm {mlx_version()} has no implementation of model_type {spec.model_type!r}")
    problems = index.adapter.mlx_folder_problems(index.config)
    if problems:
        raise MoesiftError(f"mlx cannot run {str(index.directory)!r} ({spec.model_type}): {'; '.join(problems)}")


def check_mlx_model(index: CheckpointIndex) -> None:
    """`check_runnable`, and one error line when moesift does not restrict the router of `index` in mlx-lm
    (the family's adapter says where mlx-lm keeps the router: `Adapter.mlx_router`)."""
    check_runnable(index)
    if index.adapter.mlx_router is None:
        raise MoesiftError(f"moesift restricts the routing of mlx-lm models of {', '.join(recordable_model_types())} "
                           f"only, not {index.spec.model_type}")


def open_mlx(index: CheckpointIndex) -> MlxRunner:
    """The model of an mlx-lm folder loaded by mlx-lm (strict: every stored tensor must be used), in float32."""
    return MlxRunner(index.directory, index.config)


def _masked(gate: Any, mask: Any) -> Any:
    """An mlx module that returns the router `gate`'s logits plus `mask` (0 for resident experts, -inf else)."""
    import mlx.nn as nn

    class MaskedGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = gate
            self.mask = mask

        def __call__(self, x: Any) -> Any:
            out = self.inner(x)
            return out + self.mask.astype(out.dtype)

    return MaskedGate()


def _masked_select(gate: Any, mask: Any, select: Any) -> Any:
    """An mlx module that selects as the selecting router `gate` does, from its logits ``x @ gate.weight.T``,
    with `mask` applied by the family's `select` (`moesift.arch.spec.MlxRouter`)."""
    import mlx.nn as nn

    class MaskedSelect(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = gate
            self.mask = mask

        def router_logits(self, x: Any) -> Any:
            return router_logits(self.inner, x) + self.mask

        def __call__(self, x: Any) -> Any:
            return select(self.inner, router_logits(self.inner, x), self.mask)

    return MaskedSelect()


def is_loaded_mlx_model(model: Any) -> bool:
    """True when `model` is a model built by mlx-lm (what `mlx_lm.load` returns); never imports mlx."""
    return type(model).__module__.split(".")[0] == "mlx_lm"


def loaded_mlx_config(model: Any) -> dict[str, Any]:
    """The config of a model built by mlx-lm, as a dict of plain JSON values: the fields of its `args`
    (mlx-lm's ModelArgs, read from the folder's config.json; keys mlx-lm does not read are not there, and
    the quantization entry is not, which the plan's identity check ignores anyway) and its model_type."""
    args = getattr(model, "args", None)
    if args is None:
        raise MoesiftError(f"{type(model).__module__}.{type(model).__name__} keeps no `args`: not a model "
                           "built by mlx_lm.load")
    cfg = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    mt = getattr(model, "model_type", None) or cfg.get("model_type")
    if not mt:
        raise MoesiftError(f"{type(model).__module__}.{type(model).__name__} does not say its model_type")
    cfg["model_type"] = mt
    return json.loads(json.dumps(cfg, default=str))


@contextlib.contextmanager
def masked_routers(model: Any, adapter: Any, spec: Any, resident: Mapping[int, Sequence[int]],
                   where: str) -> Iterator[None]:
    """Within the block, the mlx-lm `model` (of the family of `adapter`, shapes `spec`) routes every MoE layer
    in `resident` as if experts outside the set did not exist: its router module (`Adapter.mlx_router`) is
    wrapped so that their router logits are -inf before the family's scoring and top-k (and their selection
    bias -inf too, for families with one). Leaving the block puts the original modules back. `where` names
    the model in errors."""
    import mlx.core as mx

    router = adapter.mlx_router
    if router is None:
        raise MoesiftError(f"moesift restricts the routing of mlx-lm models of {', '.join(recordable_model_types())} "
                           f"only, not {spec.model_type}")
    E, moe = spec.n_experts, set(spec.moe_layers)
    saved: list[tuple[Any, str, Any]] = []
    try:
        for layer, ids in sorted(resident.items()):
            if layer not in moe:
                raise MoesiftError(f"decoder layer {layer} has no router in {where}")
            parent_path, attr = router.gate_path(layer).rsplit(".", 1)
            parent = get_path(model, parent_path)
            gate = getattr(parent, attr)
            mask = np.full(E, -math.inf, dtype=np.float32)
            mask[list(ids)] = 0.0
            m = mx.array(mask)
            setattr(parent, attr, _masked_select(gate, m, router.select) if router.select else _masked(gate, m))
            saved.append((parent, attr, gate))
        yield
    finally:
        for parent, attr, gate in reversed(saved):
            setattr(parent, attr, gate)


@contextlib.contextmanager
def restricted(model: Any, index: CheckpointIndex, resident: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Within the block, the mlx-lm `model` of `index` routes every MoE layer in `resident` as if experts
    outside the set did not exist (`masked_routers`)."""
    check_mlx_model(index)
    with masked_routers(model, index.adapter, index.spec, resident, repr(str(index.directory))):
        yield
