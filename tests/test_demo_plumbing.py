"""Fast checks of the demo's and ablation runner's pure helpers (the full demo is not run in CI)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gfscreen_lab.experiments.ablation import ABLATION_COLUMNS, ARMS, QUICK_SUFFIX, format_ablation_table, select_arms
from gfscreen_lab.experiments.runner import (FULL, LAB_COMMANDS, OUR_COMMANDS, QUICK, DemoSettings, command_line,
                                             results_markdown)
from gfscreen_lab.experiments.cpu_plans import CPU_ARCH_KWARGS, shrink_configuration_for_cpu, total_stride

REPO = Path(__file__).resolve().parents[1]


def _plans():
    """A minimal plans dict shaped like nnU-Net's: a planned 3d_fullres and a GF-Screen child."""
    arch = {"network_class_name": "PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [32, 64, 128],
                            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2]}}
    return {"configurations": {"3d_fullres": {"patch_size": [32, 96, 96], "batch_size": 2, "architecture": arch},
                               "3d_fullres_gfscreen": {"inherits_from": "3d_fullres", "gfscreen": {"group_size": 4}}}}


def test_total_stride_multiplies_stage_strides_per_axis():
    assert total_stride([[1, 1, 1], [1, 2, 2], [2, 2, 2]]) == [2, 4, 4]
    assert total_stride(CPU_ARCH_KWARGS["strides"]) == [4, 8, 8]
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        total_stride([[1, 1, 1], [2, 2]])


def test_shrink_edits_only_the_child_configuration():
    plans = _plans()
    before = json.dumps(plans, sort_keys=True)
    out = shrink_configuration_for_cpu(plans, "3d_fullres_gfscreen", (16, 48, 48), {"features_per_stage": [8, 16, 32]},
                                       batch_size=3)
    assert json.dumps(plans, sort_keys=True) == before, "the input plans must not be modified"
    child = out["configurations"]["3d_fullres_gfscreen"]
    assert child["patch_size"] == [16, 48, 48] and child["batch_size"] == 3
    assert child["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32]
    # everything else of the inherited architecture is kept, and the parent is untouched
    assert child["architecture"]["arch_kwargs"]["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    assert child["inherits_from"] == "3d_fullres" and child["gfscreen"] == {"group_size": 4}
    assert out["configurations"]["3d_fullres"] == _plans()["configurations"]["3d_fullres"]


def test_shrink_refuses_patch_not_divisible_by_stride_and_unknown_configuration():
    with pytest.raises(ValueError, match=r"\[16, 50, 48\].*\[2, 4, 4\]"):
        shrink_configuration_for_cpu(_plans(), "3d_fullres_gfscreen", (16, 50, 48))
    with pytest.raises(ValueError, match="must have 3"):
        shrink_configuration_for_cpu(_plans(), "3d_fullres_gfscreen", (16, 48))
    with pytest.raises(ValueError, match="'2d'"):
        shrink_configuration_for_cpu(_plans(), "2d", (16, 48, 48))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        shrink_configuration_for_cpu(_plans(), "3d_fullres_gfscreen", (16, 48, 48), batch_size=0)


@pytest.mark.parametrize("settings", [FULL, QUICK])
def test_demo_settings_are_consistent_with_the_cpu_network(settings):
    strides = total_stride(settings.arch_kwargs["strides"])
    assert all(p % s == 0 for p, s in zip(settings.patch_size, strides))
    # several tiles per case (step 0.5), so there is something to gate
    tiles = 1
    for n, p in zip(settings.shape, settings.patch_size):
        tiles *= -(-(n - p) // (p // 2)) + 1
    assert tiles >= 9


def test_demo_settings_refuse_bad_values():
    with pytest.raises(ValueError, match=r"\(16, 200, 48\).*\(32, 96, 96\)"):
        DemoSettings(1, 6, 2, (32, 96, 96), (16, 200, 48), "GFScreenTrainer_Tiny")
    with pytest.raises(ValueError, match="got 4 and 1"):
        DemoSettings(1, 4, 1, (32, 96, 96), (16, 48, 48), "GFScreenTrainer_Tiny")


def test_command_line_runs_our_entry_functions_and_nnunet_scripts(tmp_path):
    argv = command_line("nnUNetv2_gfscreen_evaluate", ["-pred", tmp_path, "-np", 2], python="/x/bin/python")
    assert argv[:2] == ["/x/bin/python", "-c"]
    assert "from nnunetv2_gfscreen.evaluation.evaluate_folder import evaluate_entry_point" in argv[2]
    assert argv[3:] == ["-pred", str(tmp_path), "-np", "2"]
    for target in OUR_COMMANDS.values():  # every mapped entry function exists
        module, func = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func))
    assert command_line("nnUNetv2_gfscreen_make_dataset", ["-d", 7], python="/x/bin/python") == \
        ["/x/bin/python", "-m", "gfscreen_lab.synthetic.dataset", "-d", "7"]
    assert set(LAB_COMMANDS) == {"nnUNetv2_gfscreen_make_dataset"}
    (tmp_path / "nnUNetv2_train").write_text("")
    assert command_line("nnUNetv2_train", ["1"], python=str(tmp_path / "python")) == \
        [str(tmp_path / "nnUNetv2_train"), "1"]
    with pytest.raises(FileNotFoundError, match="nnUNetv2_nope"):
        command_line("nnUNetv2_nope", [], python=sys.executable)


@pytest.mark.parametrize("module, prog", [("gfscreen_lab.synthetic.dataset", "python -m gfscreen_lab.synthetic.dataset"),
                                          ("gfscreen_lab.experiments.demo", "python -m gfscreen_lab.experiments.demo"),
                                          ("gfscreen_lab.experiments.ablation",
                                           "python -m gfscreen_lab.experiments.ablation")])
def test_lab_commands_run_as_modules_under_their_program_names(module, prog):
    """The lab is not installed: its commands are `python -m MODULE`, with the program name in their help."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {prog} ")


def test_select_arms_covers_the_paper_ablation_and_quick_names():
    assert [t for _, t in select_arms(None, False)] == [t for _, t in ARMS]
    assert len(ARMS) == 7
    quick = select_arms(["GFScreenTrainer", "GFScreenTrainer_Group4"], True)
    assert [t for _, t in quick] == ["GFScreenTrainer" + QUICK_SUFFIX, "GFScreenTrainer_Group4" + QUICK_SUFFIX]
    with pytest.raises(ValueError, match="GFScreenTrainer_Nope"):
        select_arms(["GFScreenTrainer_Nope"], False)


def test_quick_arms_exist_and_keep_their_ablation_switch():
    from gfscreen_lab import trainers as lab_trainers
    from gfscreen_lab.trainers import ShortSchedule
    from nnunetv2_gfscreen import trainers
    for _, full_name in ARMS:
        short = getattr(lab_trainers, full_name + QUICK_SUFFIX)
        full = getattr(trainers, full_name)
        assert issubclass(short, full) and issubclass(short, ShortSchedule)
        for hook in ("compute_rewards", "grl_alpha", "glance_objective", "dense_objective", "dense_map_weight"):
            assert getattr(short, hook) is getattr(full, hook), (full_name, hook)
        assert short.settings_overrides == full.settings_overrides
        assert (short.short_epochs, short.short_iterations) == (ShortSchedule.short_epochs,
                                                                ShortSchedule.short_iterations)
        if full_name != "GFScreenTrainer":  # the method benchmark's schedules of every arm: DemoLong's and Demo's
            for suffix, default in (("_DemoLong", lab_trainers.GFScreenTrainer_DemoLong),
                                    ("_Demo", lab_trainers.GFScreenTrainer_Demo)):
                arm = getattr(lab_trainers, full_name + suffix)
                assert issubclass(arm, full) and (arm.short_epochs, arm.short_iterations) == \
                    (default.short_epochs, default.short_iterations)
                assert arm.settings_overrides == {**default.settings_overrides, **full.settings_overrides}
                for hook in ("compute_rewards", "grl_alpha", "glance_objective", "dense_objective", "dense_map_weight"):
                    assert getattr(arm, hook) is getattr(full, hook), (full_name, suffix, hook)


def test_ablation_table_formats_percentages_and_missing_values():
    agg = {"dsc_mean": 0.5, "nsd_mean": 0.25, "lesion_sensitivity": 2 / 3, "fp_per_case": 1.5,
           "selection_ratio_mean": 0.125, "tile_sensitivity": 1.0}
    table = format_ablation_table([("GRL", "GFScreenTrainer", agg), ("dense map alone", "GFScreenTrainer_DenseOnly", {})])
    lines = table.strip().split("\n")
    assert len(lines) == 4 and lines[0].count("|") == len(ABLATION_COLUMNS) + 3
    assert lines[2] == "| GRL | `GFScreenTrainer` | 50.0 | 25.0 | 66.7 | 1.50 | 12.5 | 100.0 | n/a |"
    assert lines[3].endswith("| n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
    with pytest.raises(ValueError):
        format_ablation_table([])


def test_results_markdown_holds_table_machine_and_step_times():
    md = results_markdown("T", "| a |\n|---|\n| 1 |\n", {"k": 1}, {"train": 61.4, "predict": 2.6}, "2-core box",
                          ["note one"])
    assert md.startswith("# T\n\n| a |")
    assert "- note one" in md and "Machine: 2-core box" in md
    assert "| train | 61 |" in md and "| predict | 3 |" in md
    assert json.loads(md.split("```json\n")[1].split("```")[0]) == {"k": 1}


# ---------------------------------------------------------------------- screening figures (demo, benchmark)
def _bins(pairs):
    from nnunetv2_gfscreen.core.lesions import SIZE_BIN_KEYS, SIZE_BINS
    return [{"bin": b, "key": k, **p} for b, k, p in zip(SIZE_BINS, SIZE_BIN_KEYS, pairs)]


def _runs(n_cases, dense_found, gated_found, dsc, fp, tiles, selected, covered_bins, random_bins, decisions):
    """Runner.predict_and_evaluate-shaped runs; *_found and covered_bins are per size bin (lesions, count)."""
    def agg(found, dsc_mean, n_fp):
        return {"n_cases": n_cases, "n_lesions": sum(m for m, _ in found), "n_found": sum(k for _, k in found),
                "dsc_mean": dsc_mean, "n_fp_components": n_fp,
                "size_bins": _bins([{"lesions": m, "found": k} for m, k in found])}
    lesions = sum(m for m, _ in covered_bins)
    gate = {"tiles": tiles, "tiles_selected": selected, "lesions": lesions,
            "lesions_covered": sum(k for _, k in covered_bins),
            "random_lesion_coverage": sum(m * r for (m, _), r in zip(covered_bins, random_bins)) / lesions,
            "size_bins": _bins([{"lesions": m, "covered": k, "random_coverage": r if m else None}
                                for (m, k), r in zip(covered_bins, random_bins)]),
            "decisions": decisions}
    return {"dense": agg(dense_found, dsc[0], fp[0]), "gated": {**agg(gated_found, dsc[1], fp[1]), "gate": gate}}


def _decisions(cases, fallback, floor, grown):
    return {"cases": cases, "fallback_cases": fallback, "tiles_by_floor": floor, "tiles_by_fallback": 0,
            "tiles_grown": grown}


def test_screening_figures_pool_counts_and_judge_the_targets_by_hand():
    from gfscreen_lab.experiments.screening import check_targets, pool_counts, rates, set_counts, sets_table, size_table
    a = set_counts(_runs(4, [(6, 6), (3, 3), (1, 1)], [(6, 5), (3, 3), (1, 1)], (0.8, 0.79), (2, 1), 100, 10,
                         [(6, 5), (3, 3), (1, 1)], [0.2, 0.5, 0.4], _decisions(4, 1, 3, 2)))
    b = set_counts(_runs(5, [(1, 1), (2, 2), (1, 1)], [(1, 1), (2, 2), (1, 1)], (0.6, 0.6), (0, 0), 50, 5,
                         [(1, 1), (2, 2), (1, 1)], [0.0, 0.5, 1.0], _decisions(5, 0, 0, 1)))
    ra = rates(a)
    assert (ra["dense_sensitivity"], ra["gated_sensitivity"], ra["selection_ratio"]) == (1.0, 0.9, 0.1)
    assert ra["random_lesion_coverage"] == pytest.approx((6 * 0.2 + 3 * 0.5 + 0.4) / 10)
    assert ra["size_bins"][0]["gated_sensitivity"] == pytest.approx(5 / 6) and ra["fallback_rate"] == 0.25
    t = check_targets(ra, shifted=False)
    assert [v["met"] for v in t.values()] == [True, False, False, True, True]  # DSC 79 vs 80 - 1: met, exactly
    assert t["selection ratio <= 15%"]["value"] == "10.0%"
    pooled = rates(pool_counts([a, b]))
    assert (pooled["cases"], pooled["lesions"]) == (9, 14)
    assert pooled["gated_sensitivity"] == pytest.approx(13 / 14) and pooled["selection_ratio"] == pytest.approx(0.1)
    assert pooled["dense_dsc"] == pytest.approx((4 * 0.8 + 5 * 0.6) / 9) and pooled["gated_fp_per_case"] == 1 / 9
    assert [b_["lesions"] for b_ in pooled["size_bins"]] == [7, 5, 2]
    assert pooled["size_bins"][1]["random_lesion_coverage"] == pytest.approx(0.5)
    assert (pooled["fallback_cases"], pooled["tiles_by_floor"], pooled["tiles_grown"]) == (1, 3, 3)
    # only the < 500 mm3 bin holds >= 5 lesions: 6/7 gated against 7/7 dense is more than 2 points
    assert check_targets(pooled, shifted=False)["... and in every size bin with >= 5 lesions"]["met"] is False
    shifted = check_targets(ra, shifted=True)
    assert [v["met"] for v in shifted.values()] == [False]   # 90 vs 100: more than 5 points
    assert check_targets(rates(b), shifted=True)["shifted: gated lesion-level sensitivity >= dense - 5 points"]["met"]
    table = sets_table([("A", ra)]).splitlines()
    assert table[2] == "| A | 4 | 10 | 100.0 | 90.0 | 80.0 | 79.0 | 0.50 | 0.25 | 10.0 | 90.0 | 31.0 | 1 | 3 | 2 |"
    sizes = size_table([("A", ra)]).splitlines()
    assert sizes[2] == "| A | <500 mm3 | 6 | 100.0 | 83.3 | 83.3 | 20.0 |" and len(sizes) == 5


def test_calibration_summary_states_what_is_certified_or_why_not():
    from gfscreen_lab.experiments.screening import calibration_lines, calibration_summary
    cert = {"threshold": 2.5, "target": 0.98, "confidence": 0.95, "cases_with_lesions": 3, "lesions": 5,
            "lesions_covered": 5, "lesion_sensitivity": 1.0, "expected_sensitivity_certified": 0.75,
            "lesion_sensitivity_lower_bound": 0.549, "target_certifiable": False, "cases_needed_for_target": 49,
            "size_bins": _bins([{"lesions": 2, "covered": 2}, {"lesions": 3, "covered": 3},
                                {"lesions": 0, "covered": 0}])}
    record = {"version": 2, "calibrated": True, "source": "fold 0 validation", "n_cases": 4,
              "rule": {"threshold": 2.5, "floor": 0.02, "envelope": [-9.0, -1.0]},
              "fit": {"method": "not certifiable with these cases: every calibration lesion covered"},
              "certified": cert, "certified_threshold_only": {**cert, "lesions_covered": 4},
              "note": "not certifiable", "loco": {"selection_ratio": 0.05, "lesion_sensitivity": 0.8, "lesions": 5,
                                                  "lesions_covered": 4, "n_outside_envelope": 1}}
    summary = calibration_summary(record)
    assert summary["certified"]["expected_sensitivity_certified"] == 0.75 and summary["loco"]["lesions_covered"] == 4
    text = "\n".join(calibration_lines(summary))
    assert "75.0%" in text and "54.9%" in text and "needs at least 49" in text
    assert "4/5 calibration lesions covered" in text and "lesion-level coverage 80.0% (4/5)" in text
    assert "1 case(s) outside the envelope" in text and "Calibration note: not certifiable." in text
    assert "UNCALIBRATED" in calibration_lines(calibration_summary({"version": 2, "calibrated": False,
                                                                     "reason": "no lesion"}))[0]
    assert "older format" in calibration_lines(calibration_summary({"threshold": 0.3, "loco": {}}))[0]
    assert "no calibration" in calibration_lines(calibration_summary({}))[0]


def _benchmark():
    import importlib.util
    spec = importlib.util.spec_from_file_location("learning_check", REPO / "benchmarks" / "learning_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_test_sets_are_held_out_and_models_are_named_by_their_folder(tmp_path):
    lc = _benchmark()
    unshifted = [ts for ts in lc.TEST_SETS if ts.shift is None]
    assert len({ts.seed for ts in unshifted}) >= 3 and any(ts.shift for ts in lc.TEST_SETS)
    assert all(ts.first_case >= lc.SETTINGS.num_train for ts in lc.TEST_SETS)   # never a training case
    demo = next(ts for ts in lc.TEST_SETS if ts.key == "seed1_demo")
    assert (demo.seed, demo.first_case, demo.num_cases, demo.shape) == (FULL.seed, FULL.num_train, FULL.num_test,
                                                                        FULL.shape)
    assert len({ts.dataset_id for ts in lc.TEST_SETS} | {lc.SETTINGS.dataset_id}) == len(lc.TEST_SETS) + 1
    model = tmp_path / "GFScreenTrainer_DemoLong__nnUNetPlans__3d_fullres_gfscreen"
    with pytest.raises(SystemExit, match="fold_0"):
        lc.model_trainer(model)
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (model / "plans.json").write_text("{}")
    assert lc.model_trainer(model) == "GFScreenTrainer_DemoLong"
    with pytest.raises(SystemExit, match="<trainer>__nnUNetPlans__3d_fullres_gfscreen"):
        lc.model_trainer(tmp_path / "GFScreenTrainer__nnUNetPlans__3d_fullres")
    assert [ts.key for ts in lc.select_sets(["shifted"])] == ["shifted"]
    with pytest.raises(SystemExit, match="seed9"):
        lc.select_sets(["seed9"])


def test_runner_writes_a_boosted_test_set_and_refuses_another_boost(tmp_path):
    import dataclasses

    import numpy as np
    import SimpleITK as sitk

    from gfscreen_lab.experiments.runner import Runner, TestSet
    from gfscreen_lab.synthetic.dataset import generate_case
    settings = dataclasses.replace(QUICK, lesion_boost_hu=100.0, healthy_fraction=0.0)
    ts = TestSet("tiny", 951, 4, 6, 2, (16, 48, 48), shift="other_site")
    r = Runner(tmp_path, settings)
    raw = r.make_test_set(ts)
    assert raw.name == "Dataset951_GFScreenTest_tiny" and (raw / "lesions_boosted_100HU").is_file()
    read = lambda i: sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTs" / f"GFS_000{i}_0000.nii.gz")))
    for i in (6, 7):
        image, label, _, _ = generate_case(4, i, ts.shape, healthy=False, shift="other_site")
        expected = np.clip(image.astype(np.int32) + 100 * (label > 0), -1024, 3071)
        assert label.any() and np.array_equal(read(i), expected)
    assert r.make_test_set(ts) == raw   # a rerun skips and does not boost twice
    assert np.array_equal(read(7), expected)
    with pytest.raises(SystemExit, match="another amount"):
        Runner(tmp_path, dataclasses.replace(settings, lesion_boost_hu=150.0)).make_test_set(ts)
    with pytest.raises(SystemExit, match="different test set"):
        Runner(tmp_path, settings).make_test_set(dataclasses.replace(ts, seed=5))
