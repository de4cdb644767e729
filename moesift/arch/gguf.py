"""llama.cpp's GGUF names of the MoE families moesift knows: the architecture name a GGUF file stores under
`general.architecture` and the moesift `model_type` a plan of that model names, the metadata keys of the
expert counts, and the tensors that carry an expert dimension.

In a GGUF file a tensor's shape is listed innermost first (ggml order): the expert dimension of
`blk.N.ffn_{gate,up,down,gate_up}_exps.*`, of the router `blk.N.ffn_gate_inp.*` and of the selection bias
`blk.N.exp_probs_b.bias` is the last one, so every expert is one contiguous byte range of the tensor
(nbytes / expert_count), quantized or not: quantization blocks run along the innermost dimension."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..core.errors import MoesiftError


@dataclass(frozen=True)
class GGUFFamily:
    """One llama.cpp architecture with routed experts. `model_types`: the moesift model types whose
    transformers checkpoints llama.cpp converts to it (a plan naming any of them fits); the first is the
    default, `sigmoid_type` the one for a sigmoid router (DeepSeek-V3 and Kimi-K2 convert to `deepseek2`)."""

    arch: str
    model_types: tuple[str, ...]
    sigmoid_type: str | None = None
    # multi-token-prediction blocks stored after the decoder blocks (`{arch}.nextn_predict_layers`)
    nextn: bool = False


FAMILIES: dict[str, GGUFFamily] = {f.arch: f for f in (
    GGUFFamily("qwen3moe", ("qwen3_moe",)),
    GGUFFamily("qwen2moe", ("qwen2_moe",)),
    GGUFFamily("qwen3next", ("qwen3_next",)),
    GGUFFamily("olmoe", ("olmoe",)),
    GGUFFamily("llama", ("mixtral",)),  # Mixtral converts to `llama` with experts
    GGUFFamily("phimoe", ("phimoe",)),
    GGUFFamily("jamba", ("jamba",)),
    GGUFFamily("hunyuan-moe", ("hunyuan_v1_moe",)),
    GGUFFamily("granitemoe", ("granitemoe", "granitemoeshared")),
    GGUFFamily("granitehybrid", ("granitemoehybrid",)),
    GGUFFamily("deepseek2", ("deepseek_v2", "deepseek_v3", "kimi_k2"), sigmoid_type="deepseek_v3"),
    GGUFFamily("glm4moe", ("glm4_moe",), nextn=True),
    GGUFFamily("dots1", ("dots1",)),
    GGUFFamily("ernie4_5-moe", ("ernie4_5_moe",)),
    GGUFFamily("gpt-oss", ("gpt_oss",)),
    GGUFFamily("llama4", ("llama4_text",)),
    GGUFFamily("dbrx", ("dbrx",)),
)}

# metadata keys, each under the architecture's prefix: f"{arch}.{key}"
EXPERT_COUNT = "expert_count"
EXPERT_USED_COUNT = "expert_used_count"
EXPERT_SHARED_COUNT = "expert_shared_count"
EXPERT_GROUP_COUNT = "expert_group_count"
EXPERT_GROUP_USED_COUNT = "expert_group_used_count"
EXPERT_GATING_FUNC = "expert_gating_func"  # 1: softmax, 2: sigmoid
BLOCK_COUNT = "block_count"
EMBEDDING_LENGTH = "embedding_length"
NEXTN_PREDICT_LAYERS = "nextn_predict_layers"
GATING_SIGMOID = 2

ROUTER, ROUTER_BIAS, EXPERT = "router", "router_bias", "expert"

# tensors with an expert dimension (the last ggml dimension): routed experts (weights, biases, scales, per-expert
# norms), the router's rows and bias, the selection bias
_EXPERT_TENSOR = re.compile(
    r"^blk\.(?P<layer>\d+)\.(?P<kind>ffn_(?:gate|up|down|gate_up|norm)_exps|ffn_gate_inp|exp_probs_b)"
    r"\.(?P<part>weight|bias|scale)$")
_BLOCK = re.compile(r"^blk\.(?P<layer>\d+)\.")


def key(arch: str, name: str) -> str:
    return f"{arch}.{name}"


def family(arch: Any, path: str) -> GGUFFamily:
    """The family of a GGUF architecture name; one error line for an architecture without routed experts."""
    f = FAMILIES.get(arch) if isinstance(arch, str) else None
    if f is None:
        known = ", ".join(sorted(FAMILIES))
        raise MoesiftError(f"{path!r} holds a {arch!r} model; moesift trims the GGUF architectures with routed "
                           f"experts: {known}")
    return f


def model_type(fam: GGUFFamily, gating: Any) -> str:
    """The moesift model type of a GGUF file of family `fam` (its router's gating function decides between
    DeepSeek-V2 and V3)."""
    if fam.sigmoid_type and gating == GATING_SIGMOID:
        return fam.sigmoid_type
    return fam.model_types[0]


def expert_role(name: str) -> tuple[int, str] | None:
    """(block, ROUTER | ROUTER_BIAS | EXPERT) for a tensor with an expert dimension, else None."""
    m = _EXPERT_TENSOR.match(name)
    if m is None:
        return None
    kind = m.group("kind")
    if kind == "ffn_gate_inp":
        role = ROUTER if m.group("part") == "weight" else ROUTER_BIAS
    elif kind == "exp_probs_b":
        role = ROUTER_BIAS
    else:
        role = EXPERT
    return int(m.group("layer")), role


def block_of(name: str) -> int | None:
    """The block (decoder layer) a tensor belongs to, or None (embeddings, output)."""
    m = _BLOCK.match(name)
    return int(m.group("layer")) if m else None


def groups_after(n_experts: int, n_group: int, topk_group: int | None, ids: list[int]) -> tuple[int, int]:
    """(expert_group_count, expert_group_used_count) of a group-limited layer keeping `ids`: the groups kept
    when whole groups are dropped, else unchanged (the same count kept in every group); when every kept group
    is selectable, group limiting is a no-op and is written as one group (llama.cpp refuses
    expert_group_used_count == expert_group_count)."""
    per = n_experts // n_group
    sizes = [sum(1 for i in ids if i // per == g) for g in range(n_group)]
    nonzero = [s for s in sizes if s]
    kept = len(nonzero) if all(s == per for s in nonzero) else n_group
    top = min(int(topk_group or kept), kept)
    if top >= kept:
        kept = top = 1
    return kept, top
