"""The adapter contract: everything moesift needs to know about one MoE family.

Generic code (tracer, analysis, plan, trim, verify) talks to models and checkpoints only through an
`Adapter`. Each family file in this package subclasses `Adapter` (usually `StandardAdapter`, which
covers the common `block.gate` + `block.experts` layout of transformers 5) and registers itself with
`@register`. Generic code never tests a family name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from .spec import MlxRouter, MoESpec, Patterns, Route, TensorRole, cfg_get, group_problems


class Adapter:
    """Family knowledge. Subclass, set `model_types`, implement or inherit the methods below."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # group-limited routers: a group's score is the sum of its best `group_score_top` experts, so a group
    # kept with fewer resident experts can never be selected (0 or at least this many per group)
    group_score_top: ClassVar[int] = 2

    # ---- config ---------------------------------------------------------------------------------
    def spec(self, config: Any) -> MoESpec:
        """MoE layout from a transformers config object or a config.json dict."""
        raise NotImplementedError

    def model_shape(self, config: Any) -> dict[str, int | None]:
        """``hidden_size`` (width of a token's hidden state) and ``num_hidden_layers`` (decoder layers, dense
        ones included) from a transformers config object or a config.json dict; None where the config does
        not say. Placement needs them for all-to-all bytes and for per-decoder-layer expert maps."""
        h = cfg_get(config, "hidden_size", "d_model")
        n = cfg_get(config, "num_hidden_layers", "n_layers")
        return {"hidden_size": int(h) if h else None, "num_hidden_layers": int(n) if n else None}

    def rewrite_config(self, config: dict[str, Any], resident: Mapping[int, Sequence[int]]) -> dict[str, Any]:
        """config.json of a checkpoint trimmed to `resident` ({decoder layer: kept original ids}).

        Uniform plans must give a config that stock transformers loads. Non-uniform plans are handled by
        the trimmer (it records per-layer counts); adapters only rewrite the fields for the largest count.
        """
        raise NotImplementedError

    # config keys that transformers 5 saves under another name than hub checkpoints of the family use:
    # {transformers-5 name: hub name}
    hub_renames: ClassVar[dict[str, str]] = {}
    # keys hub checkpoints of the family carry (and engines read) with the meaning these weights need,
    # added when absent: {key: value}
    hub_defaults: ClassVar[dict[str, Any]] = {}

    def hub_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """`config` (a config.json dict) with the key names hub checkpoints of this family use, which is what
        serving engines (vLLM, SGLang, mlx-lm, llama.cpp's converter) read: transformers-5 renames undone,
        a single `rope_parameters` also written as `rope_theta` / `rope_scaling` / `partial_rotary_factor`
        (it stays: transformers 5 reads it first, and some families default to another rope without it),
        and the family's routing keys (`hub_defaults`) added where absent. Every other key is kept."""
        out = dict(config)
        for new, old in self.hub_renames.items():
            if new in out and old not in out:
                out[old] = out.pop(new)
        rope = out.get("rope_parameters")
        if isinstance(rope, Mapping) and "rope_theta" in rope:  # one rope for every layer (not per layer type)
            out.setdefault("rope_theta", rope["rope_theta"])
            if "partial_rotary_factor" in rope:
                out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
            rest = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
            kind = rest.get("rope_type", rest.get("type", "default"))
            out.setdefault("rope_scaling", None if kind == "default" else {**rest, "type": kind, "rope_type": kind})
        for k, v in self.hub_defaults.items():
            out.setdefault(k, v)
        return out

    # the input embedding and the output projection as checkpoints of the family name them
    embed_name: ClassVar[str] = "model.embed_tokens.weight"
    lm_head_name: ClassVar[str] = "lm_head.weight"
    # engines whose implementation of the family has no tied output: a config with tie_word_embeddings true
    # and no stored lm_head.weight does not load there (mlx-lm 0.32.2: measured; llama.cpp: untested, from a
    # reading of its qwen2moe loader)
    tied_output_unsupported: ClassVar[tuple[str, ...]] = ()

    def config_engine_problems(self, engine: str, config: Mapping[str, Any], stored: set[str]) -> list[str]:
        """Why `engine` would misread a config.json as transformers 5 saves it (whatever the family), with the
        tensor names `stored` in the checkpoint: a rope base given only under `rope_parameters` (mlx-lm reads
        `rope_theta` and silently uses its own default), and a tied output where the engine's
        implementation has none. Each is fixed by `trim --engine-config`."""
        problems = []
        rope = config.get("rope_parameters")
        if engine == "mlx" and isinstance(rope, Mapping) and "rope_theta" in rope and "rope_theta" not in config:
            problems.append(f"config.json gives the rope base only under rope_parameters (rope_theta {rope['rope_theta']}"
                            ", as transformers 5 saves it); mlx-lm reads the top-level rope_theta and would use its "
                            "own default: trim with --engine-config")
        if (engine in self.tied_output_unsupported and config.get("tie_word_embeddings")
                and self.lm_head_name not in stored):
            problems.append(f"tie_word_embeddings is true and no {self.lm_head_name} is stored; {engine}'s "
                            f"{config.get('model_type')} has no tied output: trim with --engine-config (stores the "
                            "output projection)")
        return problems

    def engine_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """`hub_config(config)` for a checkpoint whose output projection is stored (untied)."""
        out = self.hub_config(config)
        if out.get("tie_word_embeddings"):
            out["tie_word_embeddings"] = False
        return out

    def engine_problems(self, engine: str, config: Mapping[str, Any]) -> list[str]:
        """Why serving engine `engine` ("mlx", "llama.cpp") cannot run a checkpoint of this family with
        `config` (its config.json) although it implements the model_type; empty when it can."""
        return []

    def mlx_folder_problems(self, config: Mapping[str, Any]) -> list[str]:
        """Why mlx-lm cannot run an mlx-lm model folder (`mlx_lm.convert` output) of this family with
        `config`; by default what `engine_problems` says for "mlx" (a family whose problem is only the layout
        of a transformers checkpoint says nothing here)."""
        return self.engine_problems("mlx", config)

    def plan_problems(self, spec: MoESpec, resident: Mapping[int, Sequence[int]], standard: bool) -> list[str]:
        """Why `resident` cannot be served (empty list when it can). `standard`: must load in stock
        transformers (equal counts per layer, group rules). Generic rules are checked here."""
        problems = []
        for layer, ids in resident.items():
            if len(set(ids)) != len(ids):
                problems.append(f"layer {layer}: duplicate expert ids")
            if any(i < 0 or i >= spec.n_experts for i in ids):
                problems.append(f"layer {layer}: expert id out of range 0..{spec.n_experts - 1}")
            if len(ids) < spec.top_k:
                problems.append(f"layer {layer}: {len(ids)} experts kept, below top-k {spec.top_k}")
            if layer in spec.hash_layers and len(ids) != spec.n_experts:
                problems.append(f"layer {layer}: hash-routed layers must be kept whole")
        if standard and len({len(v) for v in resident.values()}) > 1:
            problems.append("a standard checkpoint needs the same number of experts in every MoE layer (use --uniform)")
        if spec.n_group and spec.n_group > 1:
            problems += group_problems(spec, resident, standard)
        return problems

    # ---- loaded model -----------------------------------------------------------------------------
    def moe_block(self, model: Any, layer: int) -> Any:
        """The module holding router + experts of decoder layer `layer`."""
        raise NotImplementedError

    def attach_recorder(
        self,
        model: Any,
        on_route: Callable[[int, Route], None],
        on_logits: Callable[[int, Any], None] | None = None,
        want_hidden: bool = False,
    ) -> list[Any]:
        """Install hooks that call `on_route(moe_index, Route)` once per MoE layer and forward, and
        `on_logits(moe_index, probs [T, E])` with the router probabilities over all experts (or, when
        `on_logits` has a true attribute ``wants_logits``, with the router logits [T, E] as the router
        returned them: probabilities are then the spec's scoring of their float32 value).
        Returns hook handles (call `.remove()` on each). Hooks must not copy to the host."""
        raise NotImplementedError

    def expert_output(self, model: Any, layer: int, hidden: Any, ids: Any) -> Any:
        """Output of expert ids[t] on hidden[t], unweighted: Tensor [T, H] (for saliency)."""
        raise NotImplementedError

    def replace_moe_block(self, model: Any, layer: int, block: Any) -> None:
        """Put `block` (a module built for another expert count) in place of decoder layer `layer`'s MoE
        block; used to build models whose MoE layers hold different numbers of experts."""
        raise NotImplementedError

    @contextlib.contextmanager
    def restrict(self, model: Any, resident: Mapping[int, Sequence[int]]) -> Iterator[None]:
        """Within the block, routing of each decoder layer in `resident` behaves as if experts outside
        the set did not exist (the restriction semantics: a non-resident expert can never be selected). Layers not in `resident` are untouched."""
        raise NotImplementedError
        yield

    def set_top_k(self, model: Any, k: int) -> contextlib.AbstractContextManager:
        """Context manager: route to `k` experts per token instead of top-k (quality experiments)."""
        raise NotImplementedError

    def reroute(self, model: Any, choose: Callable[[int, Any], tuple[Any, Any]]) -> contextlib.AbstractContextManager:
        """Context manager for routing experiments (dynamic top-p): on every MoE layer and forward,
        `choose(moe_index, probs [T, E])` returns (ids [T, K'], active [T, K'] bool) and the experts run on
        those ids; active slots are weighted as the family weights its own selection (same normalisation
        and scaling), inactive slots get weight 0."""
        raise NotImplementedError

    # ---- offloading (moesift.offload) -------------------------------------------------------------
    def replace_experts(self, model: Any, layer: int, module: Any) -> None:
        """Put the experts module `module` (built for another expert count) in decoder layer `layer`'s MoE
        block, keeping its router."""
        raise NotImplementedError

    def expert_params(self, module: Any) -> list[tuple[str, int, int]]:
        """(parameter name, expert dimension, rows per expert) of every tensor of an experts module: what
        moving one expert between two experts modules copies."""
        raise NotImplementedError

    def experts_apply(self, module: Any, hidden: Any, ids: Any, weights: Any) -> Any:
        """Sum over k of the family's contribution of expert ids[t, k] of `module` (its own numbering) to
        token t, weighted by weights[t, k] as the family weights it: Tensor [T, H]. Pairs with a negative
        id contribute nothing."""
        raise NotImplementedError

    def pair_reduction(self, module: Any) -> str:
        """How the experts module sums the contributions of a token's experts: "k_sum" (one row per (token,
        slot k), summed over k) or "expert_order" (from zeros, expert by expert in id order)."""
        raise NotImplementedError

    def offload_experts(self, model: Any, layer: int, run: Callable[[Any, Any, Any], Any]) -> None:
        """Make decoder layer `layer`'s MoE block obtain its routed-experts output from
        `run(hidden [T, H], ids [T, K], weights [T, K]) -> [T, H]` (original expert ids, the router's own
        choice and weights) instead of its experts module; hooks on the experts module still fire."""
        raise NotImplementedError

    # ---- checkpoint ---------------------------------------------------------------------------------
    def classify(self, name: str, config: Mapping[str, Any]) -> TensorRole:
        """Role of the on-disk tensor `name` in a checkpoint with config.json `config`."""
        raise NotImplementedError

    # tensor names of the family in an mlx-lm model folder (`mlx_lm.convert` output: stacked `switch_mlp`
    # experts, a router that may be quantized); `classify` reads them beside the transformers names
    mlx_patterns: ClassVar[Patterns] = Patterns()
    # where mlx-lm builds the family's MoE block and router and how the block selects (softmax families whose
    # routing `moesift trace --engine mlx` records); None: not recorded in mlx-lm
    mlx_router: ClassVar[MlxRouter | None] = None

    def mlx_layout(self, config: Mapping[str, Any], names: Sequence[str]) -> bool:
        """True when a checkpoint with config.json `config` and tensors `names` is an mlx-lm model folder: its
        config carries mlx-lm's "quantization" entry, or its experts are stored as the family's stacked
        mlx-lm tensors."""
        if isinstance(config.get("quantization"), Mapping):
            return True
        fused = [rx for kind, rx, _ in self.mlx_patterns.compile() if kind == "fused"]
        return any(rx.fullmatch(n) for n in names for rx in fused)

    # config keys that count multi-token-prediction layers stored after the last decoder layer
    mtp_keys: ClassVar[tuple[str, ...]] = ()

    def mtp_layers(self, config: Any) -> tuple[int, ...]:
        """Decoder-layer ids of the multi-token-prediction layers the checkpoint stores after its last decoder
        layer (DeepSeek-V3, GLM-4.5). Their experts are routed by a router of their own that no engine traces
        with the model, so a trim that removes experts drops them and sets these keys to 0 (the result is a
        consistent checkpoint without speculative MTP heads)."""
        n = cfg_get(config, *self.mtp_keys, default=0) if self.mtp_keys else 0
        if not n:
            return ()
        first = int(cfg_get(config, "num_hidden_layers", "n_layers"))
        return tuple(range(first, first + int(n)))

    def without_mtp(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` saying that the checkpoint holds no multi-token-prediction layers."""
        return {k: (0 if k in self.mtp_keys else v) for k, v in config.items()}

    def rename_expert(self, name: str, config: Mapping[str, Any], new_id: int) -> str:
        """Name of per-expert tensor `name` once its expert is renumbered to `new_id`."""
        raise NotImplementedError

    def slice_experts(self, tensor: Any, role: TensorRole, keep: Sequence[int], config: Mapping[str, Any]) -> Any:
        """Keep rows `keep` (sorted original ids) of a fused / router tensor along its expert dimension.
        Works on torch tensors; `role.expert_block` handles [E * n, ...] layouts."""
        import torch

        dim = role.expert_dim if role.expert_dim is not None and role.expert_dim >= 0 else tensor.dim() + (role.expert_dim or 0)
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        if role.expert_block:
            n = role.expert_block
            shape = list(tensor.shape)
            v = tensor.reshape(shape[:dim] + [shape[dim] // n, n] + shape[dim + 1 :])
            out = v.index_select(dim, idx)
            return out.reshape(shape[:dim] + [len(keep) * n] + shape[dim + 1 :]).contiguous()
        return tensor.index_select(dim, idx).contiguous()


# ------------------------------------------------------------------------------------------------
# The common layout of transformers 5: decoder layer -> block (router `gate` + fused `experts`).
# ------------------------------------------------------------------------------------------------


