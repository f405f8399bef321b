"""tools/compare.py and runrecord.py on hand-made run folders: intervals, pairing by seed, grouping, odd runs, the
table."""
import argparse
import json
import math

import pytest

from tools import compare
import runrecord
from data import Problem

GRPO_ARGS = {"algo": "grpo", "model": None, "data": "arithmetic", "lr": 2e-5, "rollouts_per_prompt": 8, "eval_k": 4,
             "token_budget": 1000, "steps": 100000, "out": "x", "seed": 0, "resume": False, "save_every": 10}


def make_run(folder, seed, avg=None, pass_=None, algo="grpo", done=True, argv=(), evals=True, **args):
    """A run folder as train.py leaves it: run.json and metrics.jsonl with 2 steps of 40 generated tokens (3 s and 6 s:
    4.5 s/step), evaluations of 1 s at steps 0, 1, 2 (avg rising linearly to `avg`) unless evals=False: 12 s (9 s) in
    all."""
    folder.mkdir(parents=True)
    record = {"args": {**GRPO_ARGS, "algo": algo, "seed": seed, "out": str(folder), **args},
              "argv": ["--algo", algo, "--seed", str(seed), *argv], "git": {"commit": "abc", "dirty": False},
              "model": {"path": "m", "sha256": "h"}, "resumes": [],
              "done": {"step": 2, "generated_tokens": 80} if done else None}
    (folder / "run.json").write_text(json.dumps(record))
    rows = []
    for step in (0, 1, 2):
        if step:
            rows.append({"step": step, "phase": "rl", "time/step": 3.0 * step, "generated_tokens_total": 40 * step})
        if evals and avg is not None:
            rows.append({"step": step, "eval/avg_at_k": avg * step / 2, "eval/pass_at_k": pass_ * step / 2, "eval/k": 4,
                         "eval/problems": 200, "time/eval": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def groups_of(tmp_path):
    runs = [compare.read_run(f) for f in compare.find_run_folders([tmp_path])]
    return compare.group_runs(runs)


def test_t_interval_by_hand():
    # [0.5, 0.6, 0.7]: mean 0.6; sample sd sqrt((0.01 + 0 + 0.01) / 2) = 0.1; se 0.1 / sqrt(3) = 0.057735;
    # t(0.975, df 2) = 4.3027 -> half-width 4.3027 * 0.057735 = 0.24842
    mean, half = compare.mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(0.24842, abs=1e-5)
    assert compare.mean_ci([0.42]) == (0.42, None)  # one seed: no spread to estimate
    assert compare.fmt_ci([0.42]) == "0.420 (n=1, no interval)" and compare.fmt_ci([]) == "–"
    assert compare.fmt_ci([0.5, 0.6, 0.7]) == "0.600 ± 0.248"


def test_t_quantiles_match_closed_forms():
    # df 1 (Cauchy): tan(pi * 0.475); df 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)) = 0.975 -> t = sqrt(2 * 0.9025 / 0.0975)
    assert compare.t_quantile_975(1) == pytest.approx(math.tan(math.pi * 0.475), abs=1e-4)
    assert compare.t_quantile_975(2) == pytest.approx(math.sqrt(2 * 0.9025 / 0.0975), abs=1e-4)
    assert compare.t_quantile_975(30) > compare.t_quantile_975(31) > compare.t_quantile_975(1000) > 1.96
    assert (compare.t_quantile_975(31) == pytest.approx(2.0395, abs=1e-4)
            and compare.t_quantile_975(120) == pytest.approx(1.9799, abs=1e-4))
    scipy_t = pytest.importorskip("scipy.stats").t
    for df in (3, 7, 15, 29, 45, 200):
        assert compare.t_quantile_975(df) == pytest.approx(scipy_t.ppf(0.975, df), abs=1e-4)


def test_paired_difference_over_shared_seeds(tmp_path):
    """grpo has seeds 0, 1, 3; ppo 0, 1, 2: pairs on 0 and 1 only. Differences 0.6 - 0.5 = 0.1 and 0.7 - 0.65 = 0.05:
    mean 0.075, sd sqrt(2 * 0.025^2 / 1) = 0.035355, se 0.025, t(0.975, 1) = 12.7062 -> half-width 0.31766."""
    for seed, avg in ((0, 0.5), (1, 0.65), (3, 0.9)):
        make_run(tmp_path / f"grpo-seed{seed}", seed, avg, avg)
    for seed, avg in ((0, 0.6), (1, 0.7), (2, 0.1)):
        make_run(tmp_path / f"ppo-seed{seed}", seed, avg, avg, algo="ppo")
    groups, _ = groups_of(tmp_path)
    grpo, ppo = sorted(groups, key=lambda g: g.label)
    diffs = compare.paired_differences(ppo, grpo)
    assert diffs == pytest.approx([0.1, 0.05])
    assert compare.mean_ci(diffs) == pytest.approx((0.075, 12.7062 * 0.025), abs=1e-5)
    table = compare.markdown_table(groups, [], "grpo")
    assert "| ppo | 3 (0,1,2) | 0.467 ± " in table and "+0.075 ± 0.318 (2 seeds)" in table
    assert "| grpo | 3 (0,1,3) | 0.683 ± " in table and "| baseline |" in table


def test_grouping_by_configuration(tmp_path):
    """Two grpo configurations differing in --lr are two rows labelled by it; seed and out never split a group;
    a default that only differs by algorithm (poise's rollouts per prompt) is not in the label."""
    for seed in (0, 1):
        make_run(tmp_path / f"a{seed}", seed, 0.5, 0.7, argv=["--lr", "1e-06"], lr=1e-6)
        make_run(tmp_path / f"b{seed}", seed, 0.6, 0.8, argv=["--lr", "3e-06"], lr=3e-6)
        make_run(tmp_path / f"c{seed}", seed, 0.4, 0.6, algo="poise", argv=["--lr", "1e-06"], lr=1e-6,
                 rollouts_per_prompt=2)
    groups, notes = groups_of(tmp_path)
    assert [g.shown for g in groups] == [{"lr": 1e-6}, {"lr": 3e-6}, {"lr": 1e-6}] and not notes
    assert [(g.label, [r.seed for r in g.runs]) for g in groups] == [
        ("grpo lr=1e-06", [0, 1]), ("grpo lr=3e-06", [0, 1]), ("poise lr=1e-06", [0, 1])]
    # a newer train.py's flag, absent from the older runs' run.json, with one value: pooled, and a note says so
    make_run(tmp_path / "d2", 2, 0.7, 0.9, argv=["--lr", "1e-06"], lr=1e-6, new_flag=4)
    pooled, pooled_notes = groups_of(tmp_path)
    assert [(g.label, [r.seed for r in g.runs]) for g in pooled][0] == ("grpo lr=1e-06", [0, 1, 2])
    assert any("not compared: new_flag=4" in n for n in pooled_notes)
    # the same flag with two values among the newer runs: a real difference, the runs stay apart
    make_run(tmp_path / "e3", 3, 0.7, 0.9, argv=["--lr", "1e-06", "--new-flag", "8"], lr=1e-6, new_flag=8)
    apart, apart_notes = groups_of(tmp_path)
    assert [(g.label, [r.seed for r in g.runs]) for g in apart][:3] == [
        ("grpo lr=1e-06 new_flag=4", [2]), ("grpo lr=1e-06 new_flag=8", [3]), ("grpo lr=1e-06", [0, 1])]
    assert not any("not compared" in n for n in apart_notes)
    table = compare.markdown_table(groups, [], "grpo")
    # each row is paired with the grpo row of its own lr: poise 0.4 - grpo 0.5 = -0.100 on both seeds (no spread)
    assert ("| poise lr=1e-06 | 2 (0,1) | 0.400 ± 0.000 | 0.600 ± 0.000 "
            "| -0.100 ± 0.000 (2 seeds) | 80 | 12 s | 4.5 |"
            in table)


def test_a_run_without_evaluation_lines_and_an_incomplete_run(tmp_path):
    make_run(tmp_path / "grpo-seed0", 0, 0.5, 0.7)
    make_run(tmp_path / "grpo-seed1", 1, evals=False)  # e.g. --no-eval: complete, no held-out numbers
    killed = make_run(tmp_path / "grpo-seed2", 2, 0.9, 0.9, done=False)  # killed (mid-line): never counted
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "pha')
    make_run(tmp_path / "rloo-seed0", 0, evals=False, algo="rloo")
    groups, notes = groups_of(tmp_path)
    assert [len(g.runs) for g in groups] == [2, 1]
    assert any("incomplete, left out" in n and "grpo-seed2" in n for n in notes)
    table = compare.markdown_table(groups, notes, "grpo")
    assert "| grpo | 2 (0,1) | 0.500 (n=1 of 2) | 0.700 (n=1 of 2) | baseline | 80 | 10 s | 4.5 |" in table
    assert "| rloo | 1 (0) | – | – | – (no shared seeds) | 80 | 9 s | 4.5 |" in table
    assert "no held-out evaluation at the final step" in table and "rloo-seed0" in table


def test_final_evaluation_must_be_at_the_final_step(tmp_path):
    run = make_run(tmp_path / "r", 0, 0.5, 0.5)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # the step-2 evaluation is missing
    r = compare.read_run(run)
    assert r.final is None and r.curve == [(0, 0.0), (40, 0.25)] and r.generated_tokens == 80


def test_errors_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no run folders"):
        compare.find_run_folders([tmp_path / "empty"])
    run = make_run(tmp_path / "r", 0, 0.5, 0.5)
    (run / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="says done but there is no metrics.jsonl"):
        compare.read_run(run)


def test_eval_compare_prints_the_table_and_draws_the_plot(tmp_path, capsys):
    import eval as evaluation
    for seed in (0, 1, 2):
        make_run(tmp_path / "sweep" / f"grpo-seed{seed}", seed, 0.5 + 0.1 * seed, 0.8)
        make_run(tmp_path / "sweep" / f"rloo-seed{seed}", seed, 0.55 + 0.1 * seed, 0.8, algo="rloo")
    evaluation.main(["compare", str(tmp_path / "sweep"), "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert out.startswith("| configuration | seeds | held-out avg@4 | pass@4 | Δ avg@4 vs grpo (paired seeds) |")
    assert "| rloo | 3 (0,1,2) | 0.650 ± 0.248 |" in out and "+0.050 ± 0.000 (3 seeds)" in out
    assert (tmp_path / "p.png").stat().st_size > 0 and f"]({tmp_path / 'p.png'})" in out


def test_run_record_start_resume_done(tmp_path):
    """A fresh record with versions, model and data hashes; a resume keeps it and appends; done at the end."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    args = argparse.Namespace(algo="grpo", seed=0, lr=1e-6, resume=False, data="arithmetic", eval_data=None)
    problems = [Problem("1+1", "2", "int", "a")]
    out = tmp_path / "run"
    out.mkdir()
    runrecord.write_start(out, args, ["--lr", "1e-6"], str(model), problems, problems, "cpu", 1)
    first = runrecord.load(out)
    assert (first["args"]["lr"] == 1e-6 and first["versions"]["torch"] and first["done"] is None
            and not runrecord.is_complete(out))
    assert len(first["model"]["sha256"]) == 64 and first["data"]["train"]["problems"] == 1
    (model / "model.safetensors").write_bytes(b"other weights")
    assert runrecord.model_identity(str(model))["sha256"] != first["model"]["sha256"]
    assert runrecord.data_identity("x", [Problem("1+1", "3", "int")])["sha256"] != first["data"]["train"]["sha256"]
    runrecord.mark_done(out, 5, 100)
    assert runrecord.is_complete(out)
    args.resume, args.lr = True, 2e-6
    runrecord.write_start(out, args, ["--lr", "2e-6", "--resume"], str(model), problems, problems, "cpu", 1)
    resumed = runrecord.load(out)
    assert resumed["started"] == first["started"] and resumed["model"] == first["model"] and resumed["done"] is None
    assert resumed["resumes"][0]["changed_args"] == {"lr": 2e-6} and resumed["resumes"][0]["was_done"]["step"] == 5
    assert runrecord.effective_args(resumed)["lr"] == 2e-6
