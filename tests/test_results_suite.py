"""suites/results.py's generated statements: the transfer-tuning table and the choice it makes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("results_suite", ROOT / "suites" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def _row(agent: str, dataset: str, seed: int, final: float, best_val: float) -> dict:
    setting = {"dataset": dataset, "student": "mlp", "noise": "symmetric", "noise_rate": 0.4}
    return {**setting, "agent": agent, "seed": seed, "final_test_acc": final, "best_val_acc": best_val}


DECAY_A, DECAY_B = {"meta_weight_decay": 0.3}, {"meta_weight_decay": 1.0}
A_LR = {**DECAY_A, "teacher_lr": 0.001}
A_LR_B5 = {**A_LR, "unroll": 5}
DEFAULTS_LR = {**results.DEFAULTS_AT_B5, "teacher_lr": 0.003}  # the last coordinate's candidate held out digits takes
MNIST1D, DIGITS = "mnist1d/mlp/symmetric 0.4", "digits/mlp/symmetric 0.4"


def _best_val(options: dict, dataset: str) -> float:
    """Tuning scores where held out mnist1d (judged on digits alone) chooses decay A, then teacher_lr 0.001,
    then B = 5, then keeps it, and held out digits (judged on mnist1d alone) chooses decay B at the default
    teacher_lr and B, then meta_grad's defaults at teacher_lr 0.003 (the last coordinate's own options). The decoys
    win only if a setting's own runs, or another decay's later coordinates, took part."""
    if options == DEFAULTS_LR:
        return {"digits": 0.5, "mnist1d": 0.85}[dataset]
    if options == A_LR_B5:  # wins for held out mnist1d on digits alone; with its own runs A_LR would
        return {"digits": 0.97, "mnist1d": 0.3}[dataset]
    if options == {**DECAY_B, "unroll": 5}:
        return {"digits": 0.99, "mnist1d": 0.6}[dataset]  # decoy: its own runs, for held out digits
    if options == A_LR:
        return {"digits": 0.95, "mnist1d": 0.5}[dataset]
    if options == {**DECAY_A, "teacher_lr": 0.003}:
        return {"digits": 0.7, "mnist1d": 0.99}[dataset]  # decoy for held out digits (not its decay)
    if "teacher_lr" in options and options["meta_weight_decay"] == 1.0:
        return {"digits": 0.99, "mnist1d": 0.7}[dataset]  # decoy: its own runs, for held out digits
    if options == DECAY_A:
        return {"digits": 0.9, "mnist1d": 0.5}[dataset]
    if options == DECAY_B:
        return {"digits": 0.6, "mnist1d": 0.8}[dataset]
    return {"digits": 0.6, "mnist1d": 0.5}[dataset]


def _fake_tuning_runs(argv: list[str]) -> None:
    """Stands in for evaluate.main on transfer_tuning_argv: writes the candidate's results.json."""
    shared = results.shared_options()
    options = {k: v for k, v in json.loads(argv[argv.index("--agent-options") + 1])["meta_grad"].items() if shared.get(k) != v}
    out = Path(argv[argv.index("--out") + 1])
    index = len(list(out.parent.iterdir())) if out.parent.exists() else 0  # the order the candidates ran in
    runs = []
    for dataset, uniform in (("mnist1d", 0.50), ("digits", 0.70)):
        for seed in (1000, 1001):
            runs.append(_row("uniform", dataset, seed, uniform + 0.01 * (seed % 2), 1.0))  # uniform's must not count
            for k in (1, 2):  # Δ final: mean over k of 0.01 k (index + 1) = 1.5 (index + 1) points
                final = uniform + 0.01 * (seed % 2) + 0.01 * k * (index + 1)
                runs.append(_row(f"meta_grad@held-out#{k}", dataset, seed, final, _best_val(options, dataset)))
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"runs": runs}))


def test_transfer_tuning_chooses_per_held_out_setting_from_the_other_settings_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(results.evaluate, "main", lambda argv: calls.append(argv) or _fake_tuning_runs(argv))
    results.run_transfer_tuning(tmp_path)
    expected = [
        *results.coordinate_candidates(0),
        *results.coordinate_candidates(1, DECAY_A)[1:],  # held out mnist1d chose A (on digits alone)
        *results.coordinate_candidates(1, DECAY_B)[1:],  # held out digits chose B (on mnist1d alone)
        *results.coordinate_candidates(2, A_LR)[1:],  # then teacher_lr 0.001
        *results.coordinate_candidates(2, DECAY_B)[1:],  # and the default teacher_lr
        *results.coordinate_candidates(3, A_LR_B5)[1:],  # meta_grad's defaults at each teacher_lr, once for both
    ]
    ran = [json.loads(argv[argv.index("--agent-options") + 1])["meta_grad"] for argv in calls]
    shared = results.shared_options()  # transfer.yaml's options for every pre-training, under each candidate's
    assert ran == [{**shared, **options} for options in expected], (
        "each coordinate's candidates at the choices so far, and no other"
    )
    assert results.transfer_candidates(tmp_path) == expected
    assert results.coordinate_candidates(3, A_LR_B5)[1:] == results.coordinate_candidates(3, DECAY_B)[1:]
    assert results.transfer_choice(tmp_path) == {MNIST1D: A_LR_B5, DIGITS: DEFAULTS_LR}

    suite = tmp_path / "transfer.yaml"
    suite.write_text(yaml.safe_dump({"pretrain_options": {MNIST1D: A_LR_B5, DIGITS: DEFAULTS_LR}}))
    lines = results.transfer_tuning_table(tmp_path, suite)
    rows = lines[2 : 2 + len(expected)]
    for i, (row, options) in enumerate(zip(rows, expected)):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells == [
            results.candidate_label(options),
            f"{100 * _best_val(options, 'mnist1d'):.1f}; {1.5 * (i + 1):+.1f}",
            f"{100 * _best_val(options, 'digits'):.1f}; {1.5 * (i + 1):+.1f}",
        ], row
    text = "\n".join(lines)
    assert (
        f"- held out {MNIST1D}: meta_weight_decay 0.3, then teacher_lr 0.001, then unroll 5, then teacher_lr at meta_weight_decay 0.0001, unroll 5 not taken: **meta_weight_decay 0.3, teacher_lr 0.001, unroll 5** (criterion 97.0, the next 60.0 on the last coordinate); `suites/results/transfer.yaml` uses it."
        in text
    )
    assert (
        f"- held out {DIGITS}: meta_weight_decay 1, then teacher_lr unchanged, then unroll unchanged, then teacher_lr 0.003 at meta_weight_decay 0.0001, unroll 5: **meta_weight_decay 0.0001, unroll 5, teacher_lr 0.003** (criterion 85.0, the next 80.0 on the last coordinate); `suites/results/transfer.yaml` uses it."
        in text
    )
    # options shared by every pre-training are the candidates' too; a per-setting entry that differs is named
    shared = {"agent_options": {"meta_grad": {"hidden": 32}}}
    suite.write_text(yaml.safe_dump({**shared, "pretrain_options": {MNIST1D: {**A_LR_B5, "val_batch": 64}}}))
    text = "\n".join(results.transfer_tuning_table(tmp_path, suite))
    assert (
        "(criterion 97.0, the next 60.0 on the last coordinate); `suites/results/transfer.yaml` uses val_batch 64 instead."
        in text
    )
    assert "`suites/results/transfer.yaml` uses teacher_lr 0.03 instead." in text  # digits: the yaml lacks its choice
    suite.write_text(yaml.safe_dump({**shared, "pretrain_options": {MNIST1D: A_LR_B5, DIGITS: DEFAULTS_LR}}))
    assert "\n".join(results.transfer_tuning_table(tmp_path, suite)).count("`suites/results/transfer.yaml` uses it.") == 2


def test_a_candidate_replaces_transfer_yamls_per_setting_options_as_a_whole_over_its_shared_ones(tmp_path, monkeypatch):
    """Each candidate's runs replace transfer.yaml's per-setting meta_grad pre-training options, for every
    held-out setting, as a whole, over the options it gives every pre-training: a decay-only candidate runs at
    the shared teacher_lr even where transfer.yaml sets another for the setting (here a copy of it that shares
    teacher_lr and hidden, and sets another teacher_lr per setting)."""
    config = yaml.safe_load(results.TRANSFER_SUITE.read_text())
    config["agent_options"] = {"meta_grad": {"hidden": 32, "teacher_lr": 0.002}}
    config["pretrain_options"] = {
        label: {**options, "teacher_lr": 0.001} for label, options in config["pretrain_options"].items()
    }
    suite = tmp_path / "transfer.yaml"
    suite.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(results, "TRANSFER_SUITE", suite)
    for options in [
        *results.coordinate_candidates(0),
        *results.coordinate_candidates(1, DECAY_A),
        *results.coordinate_candidates(2, A_LR),
    ]:
        cfg = results.evaluate.parse_args(results.transfer_tuning_argv(options, Path("out")))
        for setting in cfg.settings:
            held_out = cfg.held_out_options(results.setting_label(setting))
            assert held_out == {"hidden": 32, "teacher_lr": 0.002, **options}
            assert results.evaluate.resolved_options("meta_grad", held_out)["teacher_lr"] == options.get("teacher_lr", 0.002)
        assert (cfg.seed, cfg.pretrain_seed, cfg.agents) == (
            results.TRANSFER_TUNING_SEED,
            results.TRANSFER_TUNING_PRETRAIN_SEED,
            "uniform",
        )
    assert results.candidate_folder({"meta_weight_decay": 0.3}) == "decay-0.3"  # the folders of earlier tuning runs


def test_settings_that_choose_alike_share_the_next_coordinate_and_ties_go_to_the_first(monkeypatch):
    choices = {MNIST1D: [DECAY_A, A_LR, A_LR], DIGITS: [DECAY_A, DECAY_A, DECAY_A], "other": [DECAY_B, DECAY_B, DECAY_B]}
    monkeypatch.setattr(
        results,
        "held_out_search",
        lambda out, depth: {label: [{"choice": choice} for choice in chosen[:depth]] for label, chosen in choices.items()},
    )
    assert results.transfer_candidates(Path("unused")) == [
        *results.coordinate_candidates(0),
        *results.coordinate_candidates(1, DECAY_A)[1:],
        *results.coordinate_candidates(1, DECAY_B)[1:],
        *results.coordinate_candidates(2, A_LR)[1:],
        *results.coordinate_candidates(2, DECAY_A)[1:],
        *results.coordinate_candidates(2, DECAY_B)[1:],
        *results.coordinate_candidates(3, A_LR)[1:],  # a coordinate with options of its own: the same ones for every choice
    ], "each choice's next candidates once, coordinate by coordinate, in the order chosen"
    candidates = [DECAY_A, DECAY_B, A_LR]
    tied = [{MNIST1D: 0.5, DIGITS: 0.7}, {MNIST1D: 0.9, DIGITS: 0.7}, {MNIST1D: float("nan"), DIGITS: float("nan")}]
    assert results.best_without(candidates, tied, MNIST1D) == DECAY_A, "a tie on digits goes to the first; NaN never wins"
    assert results.best_without(candidates, tied, DIGITS) == DECAY_B
    mnist1d_pairflip = MNIST1D.replace("symmetric", "pairflip")
    scores = [{MNIST1D: 0.5, mnist1d_pairflip: 0.9, DIGITS: 0.6}, {MNIST1D: 0.5, mnist1d_pairflip: 0.1, DIGITS: 0.7}]
    assert results.best_without(candidates[:2], scores, MNIST1D) == DECAY_A, "mnist1d / pair-flip's score counts"
    assert results.best_without(candidates[:2], scores, MNIST1D, whole_dataset=True) == DECAY_B, "digits' alone"
    outside = "mnist/cnn/symmetric 0.4"  # a setting of none of the tuning runs: every one of them counts
    assert results.best_without(candidates[:2], scores, outside) == DECAY_A
    assert results.best_without(candidates[:2], [scores[0], {**scores[1], mnist1d_pairflip: 0.95}], outside) == DECAY_B


def test_transfer_yaml_pre_trains_with_the_committed_tuning_runs_choice():
    """suites/results/transfer.yaml holds, per held-out setting, what the committed transfer_tuning runs choose."""
    out = ROOT / "docs" / "results" / "transfer_tuning"
    if results.finished("transfer_tuning") is None:
        pytest.skip("the transfer_tuning results are not in this checkout")
    config = yaml.safe_load(results.TRANSFER_SUITE.read_text())
    assert config["pretrain_options"] == results.transfer_choice(out)
    by_dataset = yaml.safe_load((results.TRANSFER_SUITE.parent / "transfer_dataset.yaml").read_text())
    assert by_dataset["pretrain_options"] == results.transfer_choice(out, whole_dataset=True)
    unseen = yaml.safe_load((results.TRANSFER_SUITE.parent / "transfer_mnist.yaml").read_text())
    assert unseen["pretrain_grid"] == config["grid"], "pre-trained on every setting the tuning runs cover"
    labels = [f"{s['dataset']}/{s['student']}/{s['noise']} {unseen['noise_rate']}" for s in unseen["grid"]]
    assert unseen["pretrain_options"] == {label: results.transfer_choice_for(out, label) for label in labels}
    with pytest.raises(ValueError, match="is a setting of the transfer tuning runs"):
        results.transfer_choice_for(out, MNIST1D)


@pytest.mark.parametrize("name,pretrain_on", [("transfer_own", "own"), ("transfer_dataset", "other-datasets")])
def test_the_reference_and_leave_one_dataset_out_suites_differ_from_transfer_only_in_what_they_pre_train_on(name, pretrain_on):
    transfer = yaml.safe_load(results.TRANSFER_SUITE.read_text())
    other = yaml.safe_load((results.TRANSFER_SUITE.parent / f"{name}.yaml").read_text())
    assert other.pop("pretrain_on") == pretrain_on and transfer.get("pretrain_on", "others") == "others"
    assert set(other.pop("agents").split(",")) <= set(transfer.pop("agents").split(","))
    if name == "transfer_dataset":  # its options: the other dataset's settings' choice (test_transfer_yaml_pre_trains...)
        assert other.pop("pretrain_options").keys() == transfer.pop("pretrain_options").keys()
    assert other == transfer


def test_the_own_setting_section_sets_each_settings_teachers_beside_the_transferred_ones(tmp_path):
    def summary(agent: str, label: str, final: float, best: float, auroc: float) -> dict:
        dataset, student, rest = label.split("/")
        noise, rate = rest.split()
        return {"agent": agent, "dataset": dataset, "student": student, "noise": noise, "noise_rate": float(rate), "student_kwargs": "null",
                "vs_uniform_final": {"mean": final}, "vs_uniform": {"mean": best}, "auroc": {"mean": auroc}}  # fmt: skip

    groups = (
        ("own", "meta_grad@own-setting", (0.10, 0.20)),
        ("transfer", "meta_grad@held-out", (-0.1, 0.0)),
        ("dataset", "meta_grad@held-out-dataset", (-0.3, -0.2)),
    )
    for name, agent, finals in groups:
        lines = [summary(f"{agent}#{k + 1}", MNIST1D, f, f / 2, 0.8 + f) for k, f in enumerate(finals)]
        lines.append(summary("uniform", MNIST1D, 0.0, 0.0, 0.5))
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"summary": lines, "runs": []}))
    sources = [("its own setting", tmp_path / "own"), ("the other settings", tmp_path / "transfer")]
    table = results.pretraining_comparison([*sources, ("the other dataset's", tmp_path / "dataset")])
    assert table[2].startswith(f"| {MNIST1D} | its own setting (2 pre-trainings) | +15.0 [")
    assert table[2].endswith("| 0.950 |") and "+7.5 [" in table[2]
    assert table[3].startswith(f"| {MNIST1D} | the other settings (2 pre-trainings) | -5.0 [")
    assert table[4].startswith(f"| {MNIST1D} | the other dataset's (2 pre-trainings) | -25.0 [") and len(table) == 6
    assert results.pretraining_comparison([*sources, ("not run yet", tmp_path / "missing")]) == table[:4] + table[5:]
    assert results.pretraining_comparison([sources[0], ("not run yet", tmp_path / "missing")]) == []

    # the online teacher of the same students comes first, its intervals over the student seeds; every group gets
    # its difference to it paired by student (the group's mean on a student minus the online teacher's), an interval
    # over the students that all its pre-trainings taught
    def run(agent: str, label: str, seed: int, final: float, auroc: float) -> dict:
        return {**summary(agent, label, 0, 0, auroc), "seed": seed, "final_test_acc": final, "auroc": auroc}

    def write(name: str, lines: list[dict], runs: list[dict]) -> None:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "results.json").write_text(json.dumps({"summary": lines, "runs": runs}))

    online_lines, online_runs = [], []
    for label, gain in ((MNIST1D, 0.12), (DIGITS, 0.30)):
        taught = summary("meta_grad", label, 0.0, 0.0, 0.9)
        taught["vs_uniform_final"], taught["vs_uniform"] = (
            {"mean": gain, "ci95": 0.02, "n": 3},
            {"mean": 0.05, "ci95": 0.0, "n": 3},
        )
        online_lines += [summary("uniform", label, 0, 0, 0.5), summary("oracle", label, 0.2, 0.2, 1.0), taught]
        online_runs += [run("meta_grad", label, seed, 0.6 + gain + seed / 100, 0.9) for seed in (0, 1, 2)]
        online_runs += [run("oracle", label, seed, 0.99, 1.0) for seed in (0, 1, 2)]
    write("online", online_lines, online_runs)
    # online: 0.72, 0.73, 0.74 on students 0-2; #1 taught all three, #2 students 0 and 1 only (student 2 is left out)
    own_runs = [
        run("meta_grad@own-setting#1", MNIST1D, 0, 0.72, 0.8),
        run("meta_grad@own-setting#1", MNIST1D, 1, 0.75, 0.8),
        run("meta_grad@own-setting#1", MNIST1D, 2, 0.70, 0.8),
        run("meta_grad@own-setting#2", MNIST1D, 0, 0.74, 0.9),
        run("meta_grad@own-setting#2", MNIST1D, 1, 0.77, 1.0),
    ]
    write("own", json.loads((tmp_path / "own" / "results.json").read_text())["summary"], own_runs)
    with_online = results.pretraining_comparison(sources, online=tmp_path / "online")
    assert with_online[0].endswith("| Δ final vs online | Δ AUROC vs online |") and with_online[1].count("---") == 7
    assert (
        with_online[2]
        == f"| {MNIST1D} | nothing: taught online (3 students) | +12.0 [+10.0, +14.0] | +5.0 [+5.0, +5.0] | 0.900 | - | - |"
    )
    # student 0: 0.73 - 0.72, student 1: 0.76 - 0.73 (AUROC 0.85 - 0.9 and 0.9 - 0.9): +2.0 over two students (paired
    # per pre-training and averaged over them it would read +1.2; with student 2 kept, +0.0)
    assert with_online[3].startswith(table[2][:-1]) and with_online[3].endswith(
        "| +2.0 [-10.7, +14.7] | -0.025 [-0.343, +0.293] |"
    )
    assert with_online[4].startswith(table[3][:-1]) and with_online[4].endswith("| - | - |")  # no students to pair
    assert (
        with_online[5]
        == f"| {DIGITS} | nothing: taught online (3 students) | +30.0 [+28.0, +32.0] | +5.0 [+5.0, +5.0] | 0.900 | - | - |"
    )
    assert len(with_online) == 7
    assert results.pretraining_comparison([sources[0]], online=tmp_path / "online")[2:4] == with_online[2:4]
    assert results.pretraining_comparison([sources[0]], online=tmp_path / "missing") == []


def test_the_online_reference_teaches_the_transfer_suites_students():
    transfer = yaml.safe_load(results.TRANSFER_SUITE.read_text())
    online = yaml.safe_load((results.TRANSFER_SUITE.parent / "transfer_online.yaml").read_text())
    assert (
        "meta_grad" in online.pop("agents").split(",")
        and online.pop("tune").keys() == {"teacher_lr"}
        and online.pop("tune_seeds") == 1
    )
    transfer.pop("agents")
    assert transfer.pop("leave_one_out") == "meta_grad" and {
        key: transfer.pop(key) for key in list(transfer) if key.startswith(("pretrain_", "agent_options"))
    }
    assert online == transfer


def test_the_warm_started_suite_is_the_transfer_suite_left_learning():
    transfer = yaml.safe_load(results.TRANSFER_SUITE.read_text())
    warm = yaml.safe_load((results.TRANSFER_SUITE.parent / "transfer_warm.yaml").read_text())
    assert warm.pop("online") is True and warm.pop("agents") == "uniform" and transfer.pop("agents").startswith("uniform,")
    assert warm == transfer


def test_the_transfer_section_names_the_options_its_teachers_were_pre_trained_with():
    rows = [
        {**_row("uniform", dataset, 0, 0.5, 0.5), "noise": noise} for dataset in ("mnist1d", "digits") for noise in ("symmetric",)
    ]
    config = {"leave_one_out": "meta_grad", "agent_options": {"meta_grad": {"hidden": 32}}, "pretrain_options": {DIGITS: A_LR}}
    assert results.pretraining_options({"config": config, "runs": rows}) == (
        f"`meta_grad` pre-training options (over its defaults): held out {MNIST1D}: hidden 32; "
        f"held out {DIGITS}: hidden 32, meta_weight_decay 0.3, teacher_lr 0.001."
    )


def test_runs_record_the_repositorys_folders_wherever_it_is_checked_out(monkeypatch, tmp_path):
    """The suites hand the runs paths relative to the repository root (where ``main`` runs), so teacher
    paths and run folders in the committed results do not name the checkout (e.g. a worktree) they ran in."""
    calls = []
    monkeypatch.setattr(results.evaluate, "main", lambda argv: calls.append((argv, Path.cwd())))
    monkeypatch.chdir(tmp_path)  # called from elsewhere, it still runs from the repository root
    results.run_suite("digits")
    ((argv, where),) = calls
    assert argv[argv.index("--out") + 1] == "docs/results/digits" and where == results.ROOT
    assert Path.cwd() == tmp_path, "and returns to where it was called from"
    teachers = results.ROOT / "docs" / "results" / "rl" / "digits-pairflip" / "teachers" / "ppo"
    assert results.recorded_path(teachers) == "docs/results/rl/digits-pairflip/teachers/ppo"
    assert results.recorded_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere"), "a folder outside it stays absolute"


def test_a_final_tuned_suite_reruns_its_suite_under_the_final_criterion_and_shares_its_runs(monkeypatch, tmp_path):
    calls, shared = [], []
    monkeypatch.setattr(results.evaluate, "main", calls.append)
    monkeypatch.setattr(results, "share_runs", lambda source, target: shared.append((source, target)))
    results.run_suite("digits" + results.FINAL_TUNED)
    ((argv,),) = [calls]
    assert argv[argv.index("--suite") + 1].endswith("suites/results/digits.yaml")
    assert (
        argv[argv.index("--tune-by") + 1] == "final_val_acc"
        and argv[argv.index("--out") + 1] == "docs/results/digits_final_tuned"
    )
    assert shared == [
        (results.ROOT / "docs/results/digits/runs.jsonl", results.ROOT / "docs/results/digits_final_tuned/runs.jsonl")
    ]


def test_shared_runs_are_added_once_by_key(tmp_path):
    source, target = tmp_path / "suite" / "runs.jsonl", tmp_path / "final" / "runs.jsonl"
    results.share_runs(source, target)  # nothing to share yet
    assert not target.exists()
    source.parent.mkdir()
    lines = [json.dumps({"key": k, "row": {"n": i}}) for i, k in enumerate("abc")]
    source.write_text("\n".join(lines[:2] + ['{"key": "d", "ro'] + lines[2:]) + "\n")  # a line a crash cut short
    target.parent.mkdir()
    target.write_text(json.dumps({"key": "b", "row": {"n": 9}}) + "\n" + '{"key": "e"')  # ends in a cut line
    results.share_runs(source, target)
    results.share_runs(source, target)  # again: nothing new
    logged = results.read_finished(target)
    assert {k: r["row"]["n"] for k, r in logged.items()} == {"b": 9, "a": 0, "c": 2}, "its own run of b is kept, d is skipped"
    assert len(target.read_text().splitlines()) == 4, "the cut line stays on its own line"


def test_meta_grad_is_compared_with_each_other_teacher_paired_by_seed():
    def run(agent: str, seed: int, final: float, selected: float) -> dict:
        return {"agent": agent, "seed": seed, "dataset": "digits", "student": "mlp", "noise": "symmetric", "noise_rate": 0.4,
                "final_test_acc": final, "selected_test_acc": selected}  # fmt: skip

    runs = [run("meta_grad", s, 0.90 + s / 100, 0.95) for s in range(3)]
    runs += [run("l2rw", s, 0.85 + s / 100, 0.95 + (s - 1) / 100) for s in reversed(range(3))]  # 5 behind on every seed
    runs += [run("uniform", s, 0.5, 0.5) for s in range(3)]
    (line,) = results.against_rivals(runs)
    assert line.startswith("- **meta_grad** on digits/mlp/symmetric 0.4: vs l2rw +5.0 [+5.0, +5.0] (3/0/0) final, +0.0 [")
    assert "(1/1/1) at the best held-out accuracy." in line and "uniform" not in line and "mwnet" not in line


def test_a_suite_reuses_another_suites_finished_pretrainings_and_keeps_its_own(tmp_path):
    source, target = tmp_path / "transfer" / "pretrained", tmp_path / "warm" / "pretrained"
    for name, files in {
        "done": ("summary.json", "teacher.pt"),
        "interrupted": ("teacher.pt",),
        "mine": ("summary.json",),
    }.items():
        (source / name).mkdir(parents=True)
        for file in files:
            (source / name / file).write_text(f"source {file}")
    (target / "mine").mkdir(parents=True)
    (target / "mine" / "summary.json").write_text("target's own")
    results.share_pretrainings(source, target)
    assert sorted(p.name for p in target.iterdir()) == ["done", "mine"]  # an unfinished one is not reused
    assert (target / "done" / "teacher.pt").read_text() == "source teacher.pt"
    assert (target / "mine" / "summary.json").read_text() == "target's own"
    with pytest.raises(FileNotFoundError, match="no finished pre-trainings"):
        results.share_pretrainings(tmp_path / "nothing", target)


def test_a_suite_without_results_is_said_to_be_not_run_unless_its_data_is_missing(monkeypatch):
    assert results.section("transfer_warm", None)[2] == "Not run yet: `python suites/results.py --only transfer_warm`."
    monkeypatch.setattr(results, "DATA_ROOT", Path("/nonexistent"))
    assert results.section("mnist_final_tuned", None)[2].startswith("Skipped: its data is not under /nonexistent")
    assert results.section("layers_mnist1d", None)[2].startswith("Not run yet")


def test_the_rl_section_gives_each_setting_run_and_names_those_not_yet_run(tmp_path, monkeypatch):
    committed = results.ROOT / "docs" / "results" / "rl" / "digits-pairflip"
    out = tmp_path / "rl"
    (out / "digits-pairflip").mkdir(parents=True)
    for name in ("report.md", "results.json"):
        (out / "digits-pairflip" / name).write_text((committed / name).read_text())
    mnist = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    mnist.parent.mkdir(parents=True)
    mnist.write_bytes(b"")
    monkeypatch.setattr(results, "DATA_ROOT", tmp_path / "data")  # MNIST's data here: every other setting not yet run
    section = results.rl_section(out)
    assert any(line.startswith("### digits / mlp / pairflip 0.4\n") for line in section)  # its tables, from report.md
    assert [section[i - 2] for i, line in enumerate(section) if line.startswith("Not run yet")] == [
        f"### {folder}" for folder in results.rl_settings() if folder != "digits-pairflip"
    ]
    assert any("reinforce@reinforce" in line and "does not separate from uniform" in line for line in section)
    monkeypatch.setattr(results, "DATA_ROOT", tmp_path / "nothing")  # without it, MNIST's setting is skipped, and said so
    section = results.rl_section(out)
    skipped = [section[i - 2] for i, line in enumerate(section) if line.startswith("Skipped: its data is not under")]
    assert skipped == ["### mnist-symmetric"]


def test_the_rl_settings_are_the_online_suites_settings():
    # the RL teachers are compared on "the same settings": each folder's arguments are its online suite's
    settings = {folder: dict(zip(argv[::2], argv[1::2])) for folder, argv in results.rl_settings().items()}
    assert list(settings) == ["mnist1d-symmetric", "mnist1d-pairflip", "digits-symmetric", "digits-pairflip", "mnist-symmetric"]
    assert settings["mnist1d-pairflip"] == {
        "--dataset": "mnist1d", "--student": "mlp", "--noise": "pairflip", "--noise-rate": "0.4", "--val-size": "320",
        "--batch-size": "128", "--eval-every": "100",
    }  # fmt: skip
    assert settings["mnist-symmetric"]["--train-size"] == "10000"  # the mnist suite's subset, not all 60,000
    assert settings["mnist-symmetric"]["--lr"] == "0.03" and "--lr" not in settings["digits-pairflip"]
    assert settings["digits-symmetric"]["--val-size"] == "200" and "--train-size" not in settings["digits-symmetric"]
    for name in results.RL_SUITES:  # the episodes the RL teachers train on are the evaluation's
        assert yaml.safe_load((results.ROOT / "suites" / "results" / f"{name}.yaml").read_text())["steps"] == results.RL_HORIZON


def test_the_committed_results_page_is_what_the_committed_results_make():
    # a generator change, or a suite re-run, must come with the page it writes (python suites/results.py --write-only)
    page = results.results_document({name: results.finished(name) for name in results.SUITES})
    assert page == (results.ROOT / "docs" / "results.md").read_text()


def test_the_headroom_lines_keep_two_students_of_one_dataset_apart():
    def line(agent: str, student: str, final: float) -> dict:
        return {"agent": agent, "dataset": "mnist", "student": student, "noise": "symmetric", "noise_rate": 0.4,
                "final_test_acc": {"mean": final}, "selected_test_acc": {"mean": final}}  # fmt: skip

    summary = [line(agent, student, final) for student in ("mlp", "cnn") for agent, final in
               (("uniform", 0.8), ("oracle", 1.0), ("meta_grad", 0.9 if student == "mlp" else 0.85))]  # fmt: skip
    gaps = results.oracle_gap(summary)
    assert [g.split(",")[0] for g in gaps] == ["- mnist/mlp/symmetric 0.4"] * 2 + ["- mnist/cnn/symmetric 0.4"] * 2
    assert "meta_grad +50%" in gaps[0] and "meta_grad +25%" in gaps[2]
