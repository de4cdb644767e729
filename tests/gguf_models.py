"""Tiny GGUF models of llama.cpp's MoE architectures, written with gguf-py's GGUFWriter under llama.cpp's own
tensor names (gguf.constants.TENSOR_NAMES) and quantized with gguf.quants. Used by tests/test_gguf.py and
bench/trim_speed.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# arch -> what the family stores beside the routed experts
FAMILIES = {
    "qwen3moe": {},
    "qwen2moe": {"shexp": True},
    "olmoe": {},
    "llama": {},  # Mixtral
    "deepseek2": {"shexp": True, "probs_b": True, "groups": (4, 2), "dense_first": 1, "sigmoid": True},
    "gpt-oss": {"exp_bias": True},
    "glm4moe": {"shexp": True, "probs_b": True, "sigmoid": True, "nextn": 1},  # last block: multi-token prediction
}


def _names():
    from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

    return {k.name: v for k, v in TENSOR_NAMES.items() if isinstance(k, MODEL_TENSOR)}


def _quantized(a: np.ndarray, qtype_name: str, rng: np.random.Generator):
    """(array to store, raw ggml type or None): `a` (numpy order, float32) in `qtype_name`; types gguf-py cannot
    quantize (K-quants) get random bytes of the right block layout."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    q = Q[qtype_name]
    if q == Q.F32:
        return a.astype(np.float32), None
    if q == Q.F16:
        return a.astype(np.float16), None
    block, size = gguf.GGML_QUANT_SIZES[q]
    try:
        return gguf.quants.quantize(a, q), q
    except NotImplementedError:
        shape = (*a.shape[:-1], a.shape[-1] // block * size)
        return rng.integers(0, 256, size=shape, dtype=np.uint8), q


def write_model(path: Path, arch: str, qtype: str = "F32", n_layers: int = 3, n_experts: int = 8, top_k: int = 2,
                hidden: int = 64, ff: int = 32, vocab: int = 48, split_max_tensors: int = 0, seed: int = 0,
                keep_floats: dict | None = None, alignment: int | None = None) -> Path:
    """Write a tiny GGUF model of `arch` (a key of FAMILIES) whose expert tensors are stored in `qtype` (the
    other tensors in F32). `keep_floats`: filled with {tensor name: float32 array (numpy order)} of every
    expert tensor before quantization. Returns the first file written."""
    import gguf

    fam = FAMILIES[arch]
    rng = np.random.default_rng(seed)
    tn = _names()
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    if alignment:
        w.add_custom_alignment(alignment)
    if fam.get("nextn"):
        w.add_uint32(f"{arch}.nextn_predict_layers", fam["nextn"])
    w.add_block_count(n_layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(top_k)
    w.add_expert_feed_forward_length(ff)
    w.add_string("general.name", f"tiny {arch}")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(vocab)])
    if fam.get("shexp"):
        w.add_expert_shared_count(1)
    if fam.get("groups"):
        w.add_uint32(f"{arch}.expert_group_count", fam["groups"][0])
        w.add_uint32(f"{arch}.expert_group_used_count", fam["groups"][1])
    if fam.get("sigmoid"):
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if fam.get("dense_first"):
        w.add_leading_dense_block_count(fam["dense_first"])

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w.add_tensor(tn["TOKEN_EMBD"] + ".weight", f32(vocab, hidden))
    for b in range(n_layers):
        def name(k, part="weight", b=b):
            return tn[k].format(bid=b) + "." + part

        w.add_tensor(name("ATTN_NORM"), f32(hidden))
        w.add_tensor(name("ATTN_Q"), f32(hidden, hidden))
        w.add_tensor(name("FFN_NORM"), f32(hidden))
        if b < fam.get("dense_first", 0):
            for k in ("FFN_GATE", "FFN_UP"):
                w.add_tensor(name(k), f32(ff, hidden))
            w.add_tensor(name("FFN_DOWN"), f32(hidden, ff))
            continue
        w.add_tensor(name("FFN_GATE_INP"), f32(n_experts, hidden))
        if fam.get("exp_bias"):
            w.add_tensor(name("FFN_GATE_INP", "bias"), f32(n_experts))
        if fam.get("probs_b"):
            w.add_tensor(name("FFN_EXP_PROBS_B", "bias"), f32(n_experts))
        for k, shape in (("FFN_GATE_EXP", (n_experts, ff, hidden)), ("FFN_UP_EXP", (n_experts, ff, hidden)),
                         ("FFN_DOWN_EXP", (n_experts, hidden, ff))):
            a = f32(*shape)
            if keep_floats is not None:
                keep_floats[name(k)] = a
            data, raw = _quantized(a, qtype, rng)
            w.add_tensor(name(k), data, raw_dtype=raw)
            if fam.get("exp_bias"):
                w.add_tensor(name(k, "bias"), f32(n_experts, shape[1]))
        if fam.get("shexp"):
            w.add_tensor(name("FFN_GATE_INP_SHEXP"), f32(1, hidden))
            w.add_tensor(name("FFN_GATE_SHEXP"), f32(ff, hidden))
    w.add_tensor(tn["OUTPUT_NORM"] + ".weight", f32(hidden))
    w.add_tensor(tn["OUTPUT"] + ".weight", f32(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    splits = sorted(Path(path).parent.glob(Path(path).name[: -len(".gguf")] + "-00001-of-*.gguf"))
    return splits[0] if split_max_tensors and splits else Path(path)
