"""mlx-lm model folders (what `mlx_lm.convert` writes, quantized or not) run in mlx-lm: recognise such a folder,
load it with mlx-lm's own loader, and restrict the routing of a loaded model to resident experts (the router
logits of every other expert are -inf before the family's softmax and top-k), so that an MLX model and its
trim are compared on the same kernels and the same stored bytes."""

from __future__ import annotations

import contextlib
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
    problems = index.adapter.engine_problems("mlx", index.config)
    if problems:
        raise MoesiftError(f"mlx cannot run {str(index.directory)!r} ({spec.model_type}): {'; '.join(problems)}")


def check_mlx_model(index: CheckpointIndex) -> None:
    """`check_runnable`, and one error line when moesift cannot restrict the router of `index` in mlx-lm (only
    softmax routers without group limits are restricted by masking their logits)."""
    check_runnable(index)
    spec = index.spec
    if spec.scoring != "softmax" or (spec.n_group or 1) > 1:
        raise MoesiftError(f"verify of mlx-lm models restricts softmax routers only; {spec.model_type} routes with "
                           f"{spec.scoring} scores{' and expert groups' if (spec.n_group or 1) > 1 else ''}, which "
                           "moesift does not restrict in mlx-lm yet")


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


@contextlib.contextmanager
def restricted(model: Any, index: CheckpointIndex, resident: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Within the block, the mlx-lm `model` of `index` routes every MoE layer in `resident` as if experts
    outside the set did not exist: its router module (the module whose weight is the layer's router tensor)
    is wrapped so that their logits are -inf before the family's softmax and top-k."""
    import mlx.core as mx

    check_mlx_model(index)
    E = index.spec.n_experts
    routers = {t.role.layer: t.name.rsplit(".", 1)[0] for t in index.tensors
               if t.role.kind == "router" and t.name.endswith(".weight")}
    saved: list[tuple[Any, str, Any]] = []
    try:
        for layer, ids in sorted(resident.items()):
            if layer not in routers:
                raise MoesiftError(f"decoder layer {layer} has no router in {str(index.directory)!r}")
            parent_path, attr = routers[layer].rsplit(".", 1)
            parent = get_path(model, parent_path)
            gate = getattr(parent, attr)
            mask = np.full(E, -math.inf, dtype=np.float32)
            mask[list(ids)] = 0.0
            setattr(parent, attr, _masked(gate, mx.array(mask)))
            saved.append((parent, attr, gate))
        yield
    finally:
        for parent, attr, gate in reversed(saved):
            setattr(parent, attr, gate)
