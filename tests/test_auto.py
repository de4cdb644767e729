"""`--strategy auto`: the choice comes from held-out folds of the calibration text only, is reproducible,
is recorded with every candidate's validation figures, and falls back to the traces alone without text."""

from __future__ import annotations

import json
import random

import pytest

import moesift
from moesift.core.errors import MoesiftError
from moesift.evaluation.sweep import sweep
from moesift.selection import auto
from moesift.selection.planner import format_plan


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("auto")
    rng = random.Random(11)
    for name, n in (("calib", 16), ("eval", 4)):
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"input_ids": [rng.randrange(96) for _ in range(rng.randint(8, 24))]}) + "\n")
    model = tiny_dir("qwen3_moe")
    moesift.trace(model, d / "calib.jsonl", out=d / "sal.trace", saliency=True, progress=False)
    moesift.trace(model, d / "eval.jsonl", out=d / "eval.trace", progress=False)
    return model, d


def _auto_plan(model, d, seed=0):
    auto.forget_fits()  # a fresh fit: nothing carried over from another call
    return moesift.plan(d / "sal.trace", keep=0.5, model=model, calib=str(d / "calib.jsonl"), calib_length=32,
                        seed=seed, device="cpu", progress=False)


def _folds(n, seed, folds=4):
    """The fold of each of n calibration documents, dealt as auto deals them (written out here, not imported)."""
    import numpy as np

    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


def test_auto_records_every_candidate_and_is_reproducible(work):
    model, d = work
    p = _auto_plan(model, d)
    prov = p.provenance
    a = prov["auto"]
    assert prov["strategy"] == "auto" and a["validated"] and prov["chosen"] == a["chosen"]
    names = [c["strategy"] for c in a["candidates"]]
    assert names == ["frequency", "weighted", "contribution", "calibrated", "frequency+allocate",
                     "weighted+allocate", "contribution+allocate", "calibrated+allocate"]
    scored = [c for c in a["candidates"] if "ppl_ratio" in c]
    assert scored and all(c["ppl_ratio"] > 0 and c["se"] >= 0 for c in scored)
    best = min(scored, key=lambda c: c["gap"])
    assert best["strategy"] == a["chosen"] and best["gap"] == 0.0 and all(c["gap"] >= 0 for c in scored)
    # near ties: the others at most one standard error behind, named in the record and the printed plan
    assert a["ties"] == [c["strategy"] for c in scored if c["strategy"] != a["chosen"] and c["gap"] <= c["se"]]
    assert all(t in format_plan(p) for t in a["ties"]) and (not a["ties"] or "near tie" in format_plan(p))
    assert prov["allocate"] == a["chosen"].endswith("+allocate")
    assert a["fit_documents"] == [12] and a["validation_documents"] == [4] and a["seed"] == 0
    # the same seed gives the same choice, figures and sets; the plan file keeps the record
    q = _auto_plan(model, d)
    assert q.provenance["auto"]["candidates"] == a["candidates"] and q.layers == p.layers
    p.save(d / "auto.json")
    assert json.loads((d / "auto.json").read_text())["provenance"]["auto"]["chosen"] == a["chosen"]
    # another seed deals other folds
    r = _auto_plan(model, d, seed=1)
    assert r.provenance["auto"]["candidates"] != a["candidates"]


def test_auto_standard_errors_take_held_out_documents_as_units(work):
    """Documents longer than the window length are scored in several windows; the standard errors sum each
    held-out document's windows (its windows are not independent of each other)."""
    import numpy as np

    model, d = work
    auto.forget_fits()
    p = moesift.plan(d / "sal.trace", keep=0.5, model=model, calib=str(d / "calib.jsonl"), calib_length=8, seed=3,
                     device="cpu", progress=False)
    a = p.provenance["auto"]
    docs = [json.loads(x)["input_ids"] for x in (d / "calib.jsonl").read_text().splitlines()]
    fold = _folds(len(docs), seed=3)
    held = [ids for i, ids in enumerate(docs) if fold[i] == 0]
    # scored tokens of each held-out document: every window of 8 tokens (at least 2) predicts all but its first
    want = [sum(len(ids[i:i + 8]) - 1 for i in range(0, len(ids), 8) if len(ids[i:i + 8]) >= 2) for ids in held]
    r = auto.held_fit().rounds[0]
    assert np.bincount(r.documents, weights=r.full[:, 1]).tolist() == want
    assert a["validation_units"] == len(held) == 4 and a["validation_windows"] > len(held)
    assert f"of {len(held)} documents" in format_plan(p)


def test_auto_names_each_reason_once_when_no_candidate_meets_the_plan(work):
    model, d = work
    auto.forget_fits()
    with pytest.raises(MoesiftError) as e:  # fewer experts than the router's top-k: every candidate fails alike
        moesift.plan(d / "sal.trace", keep=0.01, model=model, calib=str(d / "calib.jsonl"), calib_length=32,
                     device="cpu", progress=False)
    msg = str(e.value)
    assert msg.startswith("auto: no candidate strategy could meet the plan") and msg.count("below top-k") == 1


def test_auto_never_reads_the_evaluation_data(work, monkeypatch):
    model, d = work
    read: list[str] = []
    real = auto.read_documents

    def spy(paths, *args, **kwargs):
        read.extend(str(p) for p in paths)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(auto, "read_documents", spy)
    auto.forget_fits()
    r = sweep(model, d / "sal.trace", d / "eval.jsonl", keep="0.5", calib=str(d / "calib.jsonl"), json=True,
              progress=False, timing=False, max_length=32, calib_length=32, device="cpu")
    pt = r["points"][1]
    assert pt["strategy"] == "auto" and pt["chosen"] == pt["auto"]["chosen"]
    assert read == [str(d / "calib.jsonl")] and pt["auto"]["calibration_data"] == [str(d / "calib.jsonl")]
    # by default auto calibrates on the trace's own workload files: refused when they are the evaluation data
    with pytest.raises(MoesiftError, match="evaluation data"):
        sweep(model, d / "eval.trace", d / "eval.jsonl", keep="0.5", json=True, progress=False, timing=False,
              max_length=32)


def test_auto_without_calibration_text_falls_back_in_one_line(work, capsys):
    model, d = work
    auto._NOTED.clear()
    p = moesift.plan(d / "sal.trace", keep=0.5)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "auto" in err and "contribution" in err
    assert p.provenance["chosen"] == "contribution" and not p.provenance["auto"]["validated"]
    plain = moesift.plan(d / "eval.trace", keep=0.5, model=model)  # no saliency: weighted
    assert plain.provenance["chosen"] == "weighted"
    assert "weighted" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["olmoe-ref", "qwen2moe-ref"])
def test_auto_on_the_trained_models_of_other_families(name, tmp_path):
    """The trained OLMoE-like (64 small experts, top-8) and Qwen2-MoE-like (gated shared expert) models: auto
    validates every candidate on held-out calibration documents and keeps the one with the lowest perplexity."""
    from moesift.assets import reference_model, workload

    model = reference_model(name)
    t = moesift.trace(model, workload("code", "trace"), out=tmp_path / "code.trace", saliency=True, max_samples=8,
                      max_length=64, progress=False)
    auto.forget_fits()
    p = moesift.plan(t, keep=0.25, model=model, calib=str(workload("code", "trace")), calib_samples=16,
                     calib_length=64, device="cpu", progress=False)
    a = p.provenance["auto"]
    scored = [c for c in a["candidates"] if "ppl_ratio" in c]
    assert len(scored) == 8 and a["chosen"] == min(scored, key=lambda c: (c["gap"], c["ppl_ratio"]))["strategy"]
    assert p.provenance["chosen"] == a["chosen"]
    # the plan keeps a quarter of the experts (allocated plans spread it over layers)
    kept = sum(len(layer["resident"]) for layer in p.to_dict()["layers"])
    n_experts = json.loads((model / "config.json").read_text())["num_experts"]
    assert kept == pytest.approx(0.25 * n_experts * len(p.layers), abs=len(p.layers))


def test_a_kept_fit_is_not_used_once_its_calibration_text_changed(work, tmp_path):
    """The fit kept for the process (a sweep plans every budget from one) is used again only while the
    calibration text it was made from is unchanged."""
    model, d = work
    calib = tmp_path / "c.jsonl"
    lines = (d / "calib.jsonl").read_text().splitlines(keepends=True)
    calib.write_text("".join(lines))
    auto.forget_fits()

    def fit_docs():
        p = moesift.plan(d / "sal.trace", keep=0.5, model=model, calib=str(calib), calib_length=32, device="cpu",
                         progress=False)
        return p.provenance["auto"]["fit_documents"]

    assert fit_docs() == [12]
    calib.write_text("".join(lines[:12]))  # fewer documents: 9 to fit, 3 held out
    assert fit_docs() == [9]


def test_auto_ranks_by_a_calibration_of_all_the_text_from_one_pass(work, monkeypatch):
    """Where calibrated wins, the plan ranks by the calibration of all the calibration documents, which the
    fit's one calibration pass gave (no second pass): the plan equals `plan --strategy calibrated` with
    `moesift.calibrate` on all of them. A given calibration is used instead when there is one."""
    model, d = work
    calls: list[int] = []
    real = auto.calibrate_split

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(auto, "calibrate_split", counting)
    monkeypatch.setattr(auto, "candidates", lambda bank, allocate, allow: [("calibrated", False)])
    p = _auto_plan(model, d)
    a = p.provenance["auto"]
    assert calls == [1] and a["chosen"] == "calibrated"
    assert a["final_calibration"] == "all the calibration documents"
    assert "ranks by the calibration of all the calibration documents" in format_plan(p)
    full = moesift.calibrate(model, d / "calib.jsonl", out=d / "all.calib", max_length=32, progress=False)
    ref = moesift.plan(d / "sal.trace", keep=0.5, model=model, strategy="calibrated", calibration=full)
    assert [e["resident"] for e in p.layers] == [e["resident"] for e in ref.layers]
    # the validated sets came from the fit documents' calibration (12 of 16), not from all of them
    assert auto.fit_calibration().settings["documents"] == 12 and full.settings["documents"] == 16
    # a given calibration (here one of a different half of the text, saved) ranks the plan instead
    half = moesift.calibrate(model, d / "calib.jsonl", out=d / "half.calib", max_samples=8, max_length=32,
                             progress=False)
    auto.forget_fits()
    q = moesift.plan(d / "sal.trace", keep=0.5, model=model, calib=str(d / "calib.jsonl"), calib_length=32,
                     calibration=d / "half.calib", device="cpu", progress=False)
    ref2 = moesift.plan(d / "sal.trace", keep=0.5, model=model, strategy="calibrated", calibration=half)
    assert q.provenance["auto"]["final_calibration"] == str(d / "half.calib")
    assert "final_calibration_s" not in q.provenance["auto"]["seconds"]  # nothing finished that goes unused
    assert [e["resident"] for e in q.layers] == [e["resident"] for e in ref2.layers]


def test_auto_rounds_share_one_calibration_pass(work, monkeypatch):
    """With --auto-rounds 2 two folds are held out in turn; one calibration pass gives both rounds' fit
    calibrations, each what `moesift.calibrate` gives on that round's fit documents, and the candidates are
    scored on both held-out folds."""
    model, d = work
    calls: list[int] = []
    real = auto.calibrate_split

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(auto, "calibrate_split", counting)
    auto.forget_fits()
    p = moesift.plan(d / "sal.trace", keep=0.5, model=model, calib=str(d / "calib.jsonl"), calib_length=32,
                     auto_rounds=2, device="cpu", progress=False)
    a = p.provenance["auto"]
    assert calls == [2] and a["rounds"] == 2
    assert a["fit_documents"] == [12, 12] and a["validation_documents"] == [4, 4] and a["validation_units"] == 8
    f = auto.held_fit()
    assert a["validation_windows"] == sum(len(r.full) for r in f.rounds)
    lines = (d / "calib.jsonl").read_text().splitlines()
    fold = _folds(len(lines), seed=0)
    for r, rd in enumerate(f.rounds):
        fit = [i for i in range(len(lines)) if fold[i] != r]
        assert rd.calibration.settings["subset"]["documents"] == fit
        (d / f"round{r}.jsonl").write_text("".join(lines[i] + "\n" for i in fit))
        ref = moesift.calibrate(model, d / f"round{r}.jsonl", max_length=32, progress=False)
        assert [e["order"] for e in rd.calibration.layers] == [e["order"] for e in ref.layers]


def test_plan_lets_the_model_go_and_a_sweep_keeps_it(work):
    """`moesift.plan` does not hold the loaded model once it returns (a kept fit keeps only its statistics and
    loads the model again when asked for another budget); inside `keep_fits` (a sweep) the model stays."""
    model, d = work
    p = _auto_plan(model, d)
    f = auto.held_fit()
    assert f.model is None and f.rounds and f.rounds[0].calibration is not None
    again = moesift.plan(d / "sal.trace", keep=0.5, model=model, calib=str(d / "calib.jsonl"), calib_length=32,
                         device="cpu", progress=False)  # the kept fit, the model loaded again
    assert auto.held_fit() is f and f.model is None
    assert again.provenance["auto"]["candidates"] == p.provenance["auto"]["candidates"] and again.layers == p.layers
    with auto.keep_fits():
        moesift.plan(d / "sal.trace", keep=0.25, model=model, calib=str(d / "calib.jsonl"), calib_length=32,
                     device="cpu", progress=False)
        assert f.model is not None
    assert f.model is None
