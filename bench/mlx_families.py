"""mlx-lm model folders of every family moesift runs natively in mlx-lm: per family and conversion, the MLX
trim against the MLX model restricted to the same plan, both run in mlx-lm (`moesift verify MLX MLX_TRIM`).

Tiny random models of each family (tests/engine_models.py sizes), converted by mlx-lm's own converter to 4-bit
(group size 64) and 8-bit (group size 32); the plan is traced with transformers on the unconverted model
(keep half the experts of every MoE layer); 4 prompts, 8 greedy tokens; float32 on mlx's default device.
Prints one Markdown row per family: max relative logit difference, top-1 agreement and identical greedy
generations, per conversion.

    python bench/mlx_families.py [FAMILY ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3", "glm4_moe", "dots1",
            "granitemoe", "qwen3_next", "phimoe", "gpt_oss")
CONVERSIONS = {"4-bit": dict(quantize=True, q_bits=4, q_group_size=64),
               "8-bit": dict(quantize=True, q_bits=8, q_group_size=32)}


def _source(mt: str, root: Path) -> Path:
    from engine_models import mlx_gpt_oss_source, mlx_source

    if mt == "gpt_oss":
        return mlx_gpt_oss_source(root / "hf", root / "src")
    return mlx_source(mt, root / "hf")


def measure(mt: str, root: Path) -> dict[str, dict]:
    from mlx_lm import convert

    import moesift
    from moesift.evaluation.verify import verify

    src = _source(mt, root)
    data = root / "w.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": [(7 * i + j) % 90 for j in range(24)]}) for i in range(12)))
    moesift.trace(root / "hf", data, out=root / "w.trace", max_length=32, progress=False)
    moesift.plan([root / "w.trace"], out=root / "plan.json", keep=0.5)
    out = {}
    for name, kw in CONVERSIONS.items():
        folder = root / name
        convert(str(src), str(folder), **kw)
        trimmed = moesift.trim(folder, root / "plan.json", root / f"{name}-trim", progress=False)
        out[name] = verify(folder, trimmed, max_new_tokens=8, max_samples=4, progress=False, engine="mlx")
    return out


def main(argv: list[str]) -> None:
    families = argv or list(FAMILIES)
    print("| family | " + " | ".join(CONVERSIONS) + " |")
    print("|---|" + "---|" * len(CONVERSIONS))
    for mt in families:
        with tempfile.TemporaryDirectory() as tmp:
            res = measure(mt, Path(tmp))
        cells = [f"{r['max_rel_logit_diff']:.3g} (top-1 {r['top1_agreement']:.3f}, "
                 f"{'identical' if r['generations_identical'] else 'different'} generations)" for r in res.values()]
        print(f"| `{mt}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
