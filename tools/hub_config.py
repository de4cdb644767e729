"""Give a saved model directory the config keys of its family's hub checkpoints (what serving engines read).

transformers 5 `save_pretrained` writes some keys its own way (`num_local_experts` for Qwen3-MoE's
`num_experts`, a `rope_parameters` dict instead of `rope_theta` / `rope_scaling`) and leaves out routing keys
that hub DeepSeek-V3 configs carry (`topk_method`, `scoring_func`). This rewrites config.json in place with
the adapter's `hub_config` (transformers 5 reads both spellings) and, with `--untie`, stores the output
embedding as its own `lm_head.weight` tensor (a copy of the input embedding) for engines that do not tie
them (mlx-lm's deepseek_v3), setting `tie_word_embeddings` to false: the model computes the same function.

    python tools/hub_config.py moesift/assets/models/deepseekv3-ref --untie
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hub_style(directory: Path, untie: bool = False) -> dict:
    from moesift.arch import adapter_for

    p = directory / "config.json"
    cfg = json.loads(p.read_text())
    new = adapter_for(cfg).hub_config(cfg)
    if untie and new.get("tie_word_embeddings"):
        from safetensors import safe_open
        from safetensors.torch import save_file

        files = sorted(directory.glob("*.safetensors"))
        if len(files) != 1:
            raise SystemExit(f"--untie handles a single safetensors file; {directory} has {len(files)}")
        with safe_open(files[0], "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
            tmp = files[0].with_name(f".{files[0].name}.tmp")
            save_file(tensors, tmp, metadata=meta)
            os.chmod(tmp, files[0].stat().st_mode & 0o777)
            os.replace(tmp, files[0])
        new["tie_word_embeddings"] = False
    tmp = p.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="saved model directory (rewritten in place)")
    ap.add_argument("--untie", action="store_true", help="store lm_head.weight; tie_word_embeddings false")
    args = ap.parse_args()
    print(json.dumps(hub_style(args.model, untie=args.untie), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
