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


@pytest.mark.parametrize("module, prog", [("gfscreen_lab.synthetic.dataset", "nnUNetv2_gfscreen_make_dataset"),
                                          ("gfscreen_lab.experiments.demo", "nnUNetv2_gfscreen_demo"),
                                          ("gfscreen_lab.experiments.ablation", "nnUNetv2_gfscreen_ablation")])
def test_lab_commands_run_as_modules_under_their_program_names(module, prog):
    """The lab is not installed: its commands are `python -m MODULE`, with the program name in their help."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {prog} ")


def test_select_arms_covers_the_paper_ablation_and_quick_names():
    assert [t for _, t in select_arms(None, False)] == [t for _, t in ARMS]
    assert len(ARMS) == 6
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
        for hook in ("compute_rewards", "grl_alpha", "glance_objective"):
            assert getattr(short, hook) is getattr(full, hook), (full_name, hook)
        assert short.settings_overrides == full.settings_overrides
        assert (short.short_epochs, short.short_iterations) == (ShortSchedule.short_epochs,
                                                                ShortSchedule.short_iterations)


def test_ablation_table_formats_percentages_and_missing_values():
    agg = {"dsc_mean": 0.5, "nsd_mean": 0.25, "lesion_sensitivity": 2 / 3, "fp_per_case": 1.5,
           "selection_ratio_mean": 0.125, "tile_sensitivity": 1.0}
    table = format_ablation_table([("GRL", "GFScreenTrainer", agg), ("plain CE", "GFScreenTrainer_PlainCE", {})])
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
