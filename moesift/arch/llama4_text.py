"""Llama-4 text (`llama4_text`): router `feed_forward.router` (a linear layer) keeps the top-k logits and
weights each chosen expert by the sigmoid of its logit; the experts run densely on every token scaled by that
score (0 for the others), so routing is read from the router's output rather than the experts' input. Fused
experts `feed_forward.experts.gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]`, one shared expert, MoE
layers listed in `moe_layers` (else every `interleave_moe_layer_step`-th layer)."""

from __future__ import annotations

import contextlib

from .registry import register
from .spec import Patterns, Route, cfg_get
from .standard import StandardAdapter

L = r"(?:language_model\.)?model\.layers\.(?P<layer>\d+)\.feed_forward"


@register
class Llama4Text(StandardAdapter):
    model_types = ("llama4_text",)
    block_attr = "feed_forward"
    router_attr = "router"
    n_experts_keys = ("num_local_experts", "num_experts")
    scoring = "sigmoid"
    normalise_selection = False
    patterns = Patterns(
        router=(rf"{L}\.router\.weight",),
        fused=((rf"{L}\.experts\.(gate_up_proj|down_proj)[\w.]*", 0),),
        shared=(rf"{L}\.shared_expert\.[\w.]+",),
    )

    def n_shared(self, config):
        return 1

    def is_moe_layer(self, config, i):
        layers = cfg_get(config, "moe_layers")
        if layers is None:
            step = int(cfg_get(config, "interleave_moe_layer_step", default=1) or 1)
            layers = range(step - 1, self.n_layers(config), step)
        return i in set(layers)

    def router_logits(self, router, output):
        return output[1].reshape(-1, output[1].shape[-1])

    def attach_recorder(self, model, on_route, on_logits=None, want_hidden=False):
        handles = []
        for m, layer in enumerate(self.spec(model.config).moe_layers):
            def post(mod, args, output, _m=m):
                scores, logits = output
                ids = logits.topk(mod.top_k, dim=-1).indices  # the router's own choice: same op, same tensor
                hidden = args[0].reshape(-1, args[0].shape[-1]) if want_hidden else None
                on_route(_m, Route(ids=ids, weights=scores.gather(1, ids), hidden=hidden))
                if on_logits is not None:
                    raw = getattr(on_logits, "wants_logits", False)
                    on_logits(_m, self.router_logits(mod, output) if raw else self.probs_from_router_output(mod, output))

            handles.append(self.router(model, layer).register_forward_hook(post))
        return handles

    def expert_output(self, model, layer, hidden, ids):
        import torch

        ex = self.experts(model, layer)
        out = torch.zeros_like(hidden)
        ids = ids.reshape(-1)
        for e in ids.unique().tolist():
            rows = (ids == e).nonzero().squeeze(1)
            gate, up = (hidden[rows] @ ex.gate_up_proj[e]).chunk(2, dim=-1)
            out[rows] = (up * ex.act_fn(gate)) @ ex.down_proj[e]
        return out

    def experts_apply(self, module, hidden, ids, weights):
        """Llama-4 scales each expert's input by its score (the block feeds h * score to every expert)."""
        import torch

        out = torch.zeros_like(hidden)
        for e in ids[ids >= 0].unique().tolist():
            t, k = (ids == e).nonzero(as_tuple=True)
            x = hidden[t] * weights[t, k, None].to(hidden.dtype)
            gate, up = (x @ module.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, t, (up * module.act_fn(gate)) @ module.down_proj[e])
        return out

    def offload_experts(self, model, layer, run):
        """The experts see only h * score for every expert; read h, the scores and the router's top-k from
        the router (as the recorder does) and return the sum in the first expert's rows."""
        import torch

        router, experts, box = self.router(model, layer), self.experts(model, layer), {}

        def post(mod, args, output):
            box["hidden"], box["out"] = args[0].reshape(-1, args[0].shape[-1]), output

        router.register_forward_hook(post)

        def forward(routed_in):
            scores, logits = box.pop("out")
            hidden = box.pop("hidden")
            ids = logits.topk(router.top_k, dim=-1).indices
            res = run(hidden, ids, scores.gather(1, ids))
            full = torch.zeros_like(routed_in)
            full[: res.shape[0]] = res
            return full

        experts.forward = forward

    @contextlib.contextmanager
    def reroute(self, model, choose):
        """The experts read per-expert scores [T, E] from the router: replace them by the chosen selection."""
        import torch

        handles = []
        try:
            for m, layer in enumerate(self.spec(model.config).moe_layers):
                def post(mod, args, output, _m=m):
                    scores, logits = output
                    probs = self.probs_from_router_output(mod, output)
                    ids, active = choose(_m, probs)
                    w = self.selection_weights(mod, probs, ids, active).to(scores.dtype)
                    return torch.zeros_like(scores).scatter_add(1, ids, w), logits

                handles.append(self.router(model, layer).register_forward_hook(post))
            yield
        finally:
            for h in handles:
                h.remove()
