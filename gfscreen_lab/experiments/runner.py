"""The experiment runner behind the demo, the ablation and the method benchmark: each step runs the user-facing
command line (nnU-Net's and ours) in a child process with its output streamed, so what an experiment prints
is what a user would see. Longer than 300 lines because every step of an experiment (data, plans, training,
test sets, prediction, evaluation) is one method of the one Runner, which holds the environment they share.

Re-running skips the dataset, preprocessing and training when they are complete (training resumes
from `checkpoint_latest.pth` when interrupted); prediction and evaluation always run again, so
printed tables are always measured on the spot.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunetv2_gfscreen.atomic import atomic_path, write_json
from gfscreen_lab.experiments.results_files import results_markdown
from gfscreen_lab.experiments.cpu_plans import CPU_ARCH_KWARGS, shrink_configuration_for_cpu
from gfscreen_lab.ext_trainer_env import lab_environment

# nnU-Net's commands are the installed console scripts. The product's run through their entry functions, so
# the demo works the same before and after `pip install -e .` registers new commands; the lab's (not
# installed) run as `python -m MODULE` with the repository on PYTHONPATH.
OUR_COMMANDS: Dict[str, str] = {
    "nnUNetv2_gfscreen_plan": "nnunetv2_gfscreen.plans.cli:plan_entry_point",
    "nnUNetv2_gfscreen_calibrate": "nnunetv2_gfscreen.predictors.calibrate_cli:calibrate_entry_point",
    "nnUNetv2_predict_gfscreen": "nnunetv2_gfscreen.predictors.cli:predict_gfscreen_entry_point",
    "nnUNetv2_gfscreen_evaluate": "nnunetv2_gfscreen.evaluation.evaluate_folder:evaluate_entry_point",
}
LAB_COMMANDS: Dict[str, str] = {
    "nnUNetv2_gfscreen_make_dataset": "gfscreen_lab.synthetic.dataset",
}
GFSCREEN_CONFIGURATION = "3d_fullres_gfscreen"
GFSCREEN_MODEL_FOLDER = f"GFScreenTrainer_DemoLong__nnUNetPlans__{GFSCREEN_CONFIGURATION}"
@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines one demo run; written into results.json."""
    dataset_id: int
    num_train: int
    num_test: int
    shape: Tuple[int, int, int]          # synthetic volume (z, y, x) in voxels
    patch_size: Tuple[int, int, int]     # GF-Screen configuration's patch: several tiles per case
    trainer: str
    seed: int = 0
    healthy_fraction: float = 0.25
    batch_size: int = 2
    target_sensitivity: float = 0.98     # lesion-level sensitivity the trainer calibrates the gate threshold to
    arch_kwargs: dict = field(default_factory=lambda: dict(CPU_ARCH_KWARGS))
    lesion_boost_hu: float = 0.0         # HU added inside the lesion label of the raw images (conspicuous lesions)
    # GF-Screen settings written into the plans (nnUNetv2_gfscreen_plan --set): a narrow Glance for the CPU
    # and, for schedules of a few thousand steps, a faster Glance learning rate than the paper's 3e-4
    gfscreen_settings: dict = field(default_factory=lambda: {"glance_base_features": 8, "glance_lr": 2e-3})

    def __post_init__(self):
        if len(self.shape) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"shape and patch_size must be (z, y, x), got {self.shape} and {self.patch_size}")
        if any(p > s for p, s in zip(self.patch_size, self.shape)):
            raise ValueError(f"patch_size {self.patch_size} must fit into the volume shape {self.shape}")
        if self.num_train < 5 or self.num_test < 1:
            raise ValueError(f"need num_train >= 5 (nnU-Net's 5-fold split) and num_test >= 1, "
                             f"got {self.num_train} and {self.num_test}")


# The screening experiment: the demo (seed 1, shipped model or --train) and benchmarks/learning_check.py
# (seed 0, trains the model that ships) use the same generator settings and trainer.
FULL = DemoSettings(dataset_id=901, num_train=16, num_test=8, shape=(32, 160, 160), patch_size=(16, 64, 64),
                    trainer="GFScreenTrainer_DemoLong", seed=1, lesion_boost_hu=300.0)
QUICK = DemoSettings(dataset_id=902, num_train=6, num_test=3, shape=(32, 96, 96), patch_size=(16, 48, 48),
                     trainer="GFScreenTrainer_Tiny")


DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"


@dataclass(frozen=True)
class TestSet:
    """A held-out set of synthetic cases to predict: test cases `first_case` .. `first_case + num_cases - 1` of
    `seed` (the cases a dataset with `first_case` training cases holds as test cases), optionally imaged as
    another site's scanner would (`shift`, gfscreen_lab/synthetic/dataset.py SHIFTS). Written as a test-only raw
    dataset `Dataset<dataset_id>_GFScreenTest_<key>`; its lesions are raised by the experiment's lesion_boost_hu
    like the training cases'."""
    key: str
    dataset_id: int
    seed: int
    first_case: int
    num_cases: int
    shape: Tuple[int, int, int]
    shift: Optional[str] = None
    description: str = ""

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_GFScreenTest_{self.key}"


# ---------------------------------------------------------------------- pure helpers


def command_line(name: str, args: Sequence[str], python: str = sys.executable) -> List[str]:
    """argv that runs command `name`: the lab's modules through `python -m`, the product's entry functions
    through `python -c`, nnU-Net's console scripts."""
    args = [str(a) for a in args]
    if name in LAB_COMMANDS:
        return [python, "-m", LAB_COMMANDS[name], *args]
    if name in OUR_COMMANDS:
        module, func = OUR_COMMANDS[name].split(":")
        code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; {func}()"
        return [python, "-c", code, *args]
    exe = Path(python).parent / name
    if not exe.is_file():
        raise FileNotFoundError(f"command {name} not found next to {python}; is nnunetv2 installed there?")
    return [str(exe), *args]


# ---------------------------------------------------------------------- running steps
class Runner:
    """Runs the steps of one pipeline under `root`, streaming each command's output and timing it."""

    def __init__(self, root: Path, settings: DemoSettings, device: str = "cpu"):
        self.root = Path(root).resolve()
        self.settings = settings
        self.device = device
        self.step_seconds: Dict[str, float] = {}
        env = {**os.environ, "nnUNet_raw": str(self.root / "nnUNet_raw"),
               "nnUNet_preprocessed": str(self.root / "nnUNet_preprocessed"),
               "nnUNet_results": str(self.root / "nnUNet_results"),
               "nnUNet_compile": "f", "PYTHONUNBUFFERED": "1",
               # nnU-Net's default of 8 export/preprocessing workers oversubscribes a small CPU
               "nnUNet_def_n_proc": str(min(4, os.cpu_count() or 1)),
               # idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made
               # torch with 2 threads 6x slower than with 1 (measured); passive made it 1.6x faster
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.env = lab_environment(env)  # nnU-Net finds the lab's trainers (-tr GFScreenTrainer_Tiny) in children
        self.log_file = self.root / "demo_log.txt"

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.settings.dataset_id:03d}_GFScreenSynth"

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw" / self.dataset_name

    @property
    def plans_file(self) -> Path:
        return self.root / "nnUNet_preprocessed" / self.dataset_name / "nnUNetPlans.json"

    def fold_folder(self, trainer: str) -> Path:
        return (self.root / "nnUNet_results" / self.dataset_name /
                f"{trainer}__nnUNetPlans__{GFSCREEN_CONFIGURATION}" / "fold_0")

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_file, "a") as f:
            f.write(text + "\n")

    def write_results(self, stem: str, title: str, headline: str, result: dict, table: str, settings: dict,
                      notes: Sequence[str]) -> None:
        """`<stem>.json` (result) and `<stem>.md` (`results_markdown`) in the root, atomically; then print the
        table and the notes under `headline`."""
        write_json(result, str(self.root / f"{stem}.json"), indent=2)
        with atomic_path(str(self.root / f"{stem}.md")) as tmp:
            Path(tmp).write_text(results_markdown(title, table, settings, self.step_seconds, result["machine"],
                                                  list(notes)))
        self.say("\n" + "=" * 100 + "\n" + headline + table + "\n" + "\n".join(f"- {n}" for n in notes)
                 + f"\n\nwritten to {self.root / (stem + '.md')} and {self.root / (stem + '.json')}")

    def run(self, name: str, args: Sequence[str], step: Optional[str] = None, extra_env: Optional[dict] = None
            ) -> None:
        """Run one command, streaming and logging its output; a failure stops the pipeline with its exit code."""
        argv = command_line(name, args)
        shown = f"python -m {LAB_COMMANDS[name]}" if name in LAB_COMMANDS else name
        self.say(f"\n$ {shown} {' '.join(shlex.quote(str(a)) for a in args)}")
        t0 = time.perf_counter()
        with open(self.log_file, "a") as log:
            proc = subprocess.Popen(argv, env={**self.env, **(extra_env or {})}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            code = proc.wait()
        seconds = time.perf_counter() - t0
        if step:
            self.step_seconds[step] = self.step_seconds.get(step, 0.0) + seconds
        if code != 0:
            raise SystemExit(f"{name} failed with exit code {code}; its output is above and in {self.log_file}")

    # ------------------------------------------------------------------ the steps
    def make_test_set(self, test_set: TestSet) -> Path:
        """Write `test_set` (skipped when it exists with these settings) and raise its lesions by the experiment's
        lesion_boost_hu; returns its raw folder (imagesTs, labelsTs)."""
        ts = test_set
        raw = self.root / "nnUNet_raw" / ts.dataset_name
        expected = {"seed": ts.seed, "shape_zyx": list(ts.shape), "shift": ts.shift, "test_only": True,
                    "first_test_case": ts.first_case}
        if (raw / "dataset.json").is_file():
            stored = json.loads((raw / "dataset.json").read_text()).get("gfscreen_synthetic", {})
            if {k: stored.get(k) for k in expected} != expected or \
                    len(list((raw / "imagesTs").glob("*.nii.gz"))) != ts.num_cases:
                raise SystemExit(f"{raw} holds a different test set; delete it to start again")
            self.say(f"[skip] test set {raw} exists")
        else:
            self.run("nnUNetv2_gfscreen_make_dataset",
                     ["-d", ts.dataset_id, "--name", f"GFScreenTest_{ts.key}", "--test_only", "-ntr", ts.first_case,
                      "-nts", ts.num_cases, "--shape", *ts.shape, "--seed", ts.seed,
                      "--healthy_fraction", self.settings.healthy_fraction, "-np", 2,
                      *(["--shift", ts.shift] if ts.shift else [])], "test sets")
        self.boost_lesions(raw)
        return raw

    def make_dataset(self) -> None:
        s = self.settings
        if (self.raw / "dataset.json").is_file():
            stored = json.loads((self.raw / "dataset.json").read_text()).get("gfscreen_synthetic", {})
            if stored.get("shape_zyx") == list(s.shape) and stored.get("seed") == s.seed and \
                    len(list((self.raw / "imagesTs").glob("*.nii.gz"))) == s.num_test:
                self.say(f"[skip] dataset {self.raw} exists")
                return
            raise SystemExit(f"{self.raw} holds a different dataset; delete {self.root} to start again")
        self.run("nnUNetv2_gfscreen_make_dataset",
                 ["-d", s.dataset_id, "-ntr", s.num_train, "-nts", s.num_test, "--shape", *s.shape,
                  "--seed", s.seed, "--healthy_fraction", s.healthy_fraction, "-np", 2], "dataset")

    def boost_lesions(self, raw: Optional[Path] = None) -> int:
        """Add `lesion_boost_hu` inside the label of every raw image (imagesTr and imagesTs) of `raw` (default: the
        experiment's dataset); returns how many changed. A marker file makes this idempotent, so a rerun on the
        same folder does not boost twice; a folder boosted by another amount is refused."""
        raw = self.raw if raw is None else Path(raw)
        boost = self.settings.lesion_boost_hu
        marker = raw / f"lesions_boosted_{boost:g}HU"
        others = [m.name for m in raw.glob("lesions_boosted_*HU") if m != marker]
        if others:
            raise SystemExit(f"{raw} was boosted by another amount ({others[0]}), not {boost:g} HU; delete it to "
                             f"start again")
        if boost == 0 or marker.is_file():
            return 0
        import numpy as np
        import SimpleITK as sitk
        changed = 0
        for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
            for img_path in sorted((raw / images).glob("*_0000.nii.gz")):
                lab_path = raw / labels / img_path.name.replace("_0000.nii.gz", ".nii.gz")
                img = sitk.ReadImage(str(img_path))
                arr = sitk.GetArrayFromImage(img).astype(np.float32)
                lab = sitk.GetArrayFromImage(sitk.ReadImage(str(lab_path)))
                if not lab.any():
                    continue
                arr[lab > 0] += boost
                out = sitk.GetImageFromArray(np.clip(arr, -1024, 3071).astype(np.int16))
                out.CopyInformation(img)
                sitk.WriteImage(out, str(img_path))
                changed += 1
        marker.write_text("lesion voxels of these images were raised by this many HU\n")
        self.say(f"[boost] raised the lesion voxels of {changed} images in {raw.name} by {boost:g} HU "
                 f"(conspicuous lesions)")
        return changed

    def install_model(self, source: Path, trainer: str) -> None:
        """Copy a shipped model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth, ...) to where
        nnU-Net's predictors look for `trainer` on this dataset."""
        import shutil
        target = self.fold_folder(trainer).parent
        if not (source / "fold_0" / "checkpoint_final.pth").is_file():
            raise SystemExit(f"no shipped model at {source}; train one with `python benchmarks/learning_check.py "
                             f"--export_demo_model` or run the demo with --train")
        if target.is_dir():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.md"))
        self.say(f"[model] installed the shipped model {source} as {target}")

    def plan_and_preprocess(self) -> None:
        data = self.plans_file.parent / "nnUNetPlans_3d_fullres"
        if self.plans_file.is_file() and data.is_dir() and \
                len([f for f in os.listdir(data) if f.endswith(".pkl")]) == self.settings.num_train:
            self.say(f"[skip] {self.dataset_name} is planned and preprocessed")
        else:
            self.run("nnUNetv2_plan_and_preprocess",
                     ["-d", self.settings.dataset_id, "-c", "3d_fullres", "-np", 2, "-npfp", 2], "plan+preprocess")
        s = self.settings
        # the trainer calibrates the gate at the end of training (on the fold's validation cases) to this target
        extra = [f"{k}={v}" for k, v in s.gfscreen_settings.items()]
        self.run("nnUNetv2_gfscreen_plan", ["-d", s.dataset_id, "--overwrite", "--set",
                                            f"target_lesion_sensitivity={s.target_sensitivity}", *extra],
                 "plan+preprocess")
        plans = shrink_configuration_for_cpu(json.loads(self.plans_file.read_text()), GFSCREEN_CONFIGURATION,
                                             s.patch_size, s.arch_kwargs, s.batch_size)
        self.plans_file.write_text(json.dumps(plans, indent=4))
        self.say(f"[plans] {GFSCREEN_CONFIGURATION}: patch {list(s.patch_size)} instead of the planned one and a "
                 f"narrow network (features {s.arch_kwargs.get('features_per_stage')}), batch {s.batch_size}. "
                 f"This is for CPU speed, and so that each case has several tiles for the Glance to gate; "
                 f"on a GPU keep nnU-Net's planned network.")

    def train(self, trainer: str) -> None:
        """Train fold 0; resume an interrupted run. Training ends with the trainer calibrating the gate and
        nnU-Net's final validation (validation/summary.json), so a run killed in between redoes only that."""
        fold = self.fold_folder(trainer)
        if (fold / "validation" / "summary.json").is_file() and (fold / "checkpoint_final.pth").is_file():
            self.say(f"[skip] {trainer} is trained ({fold / 'checkpoint_final.pth'})")
            return
        if (fold / "checkpoint_final.pth").is_file():
            mode = ["--val"]
        else:
            mode = ["--c"] if (fold / "checkpoint_latest.pth").is_file() else []
        self.run("nnUNetv2_train", [self.settings.dataset_id, GFSCREEN_CONFIGURATION, 0, "-tr", trainer,
                                    "-device", self.device, *mode], f"train {trainer}",
                 # augmentation in-process: on 2 cores a worker pool only adds overhead (the planner
                 # cannot take 0, so this is set for training only)
                 extra_env={"nnUNet_n_proc_DA": "0"} if self.device == "cpu" else None)

    def predict(self, trainer: str, out: Path, dense: bool, raw: Optional[Path] = None) -> Path:
        """Predict `<raw>/imagesTs` (default: the experiment's dataset) into `out`; returns the report folder."""
        raw = self.raw if raw is None else Path(raw)
        reports = out / "reports"
        self.run("nnUNetv2_predict_gfscreen",
                 ["-i", raw / "imagesTs", "-o", out, "-d", self.settings.dataset_id, "-c", GFSCREEN_CONFIGURATION,
                  "-tr", trainer, "-f", 0, "-device", self.device, "--disable_progress_bar", "-npp", 0, "-nps", 0,
                  "--report_dir", reports, "--png", *(["--dense"] if dense else [])],
                 f"predict {out.name}")
        return reports

    def evaluate(self, pred: Path, reports: Path, png: bool = False, raw: Optional[Path] = None) -> dict:
        raw = self.raw if raw is None else Path(raw)
        summary = pred / "gfscreen_summary.json"
        pictures = ["--png", "-img", raw / "imagesTs", "--png_dir", pred / "figures"] if png else []
        self.run("nnUNetv2_gfscreen_evaluate", ["-pred", pred, "-gt", raw / "labelsTs", "-reports", reports,
                                                "-o", summary, "--md", pred / "gfscreen_summary.md", "-np", 2,
                                                *pictures], f"evaluate {pred.name}")
        return json.loads(summary.read_text())

    def predict_and_evaluate(self, trainer: str, raw: Optional[Path] = None, out: Optional[Path] = None
                             ) -> Dict[str, dict]:
        """Dense and gated prediction of `<raw>/imagesTs` (default: the experiment's dataset) into
        `<out>/{dense,gated}` (default: <root>/predictions), evaluated (pictures for the gated run), plus the
        gate's figures on the test tiles and the reports' decisions (`evaluation/gate.py`) under
        runs['gated']['gate']."""
        from nnunetv2_gfscreen.evaluation.gate import gate_figures_from_folders
        raw = self.raw if raw is None else Path(raw)
        out = self.root / "predictions" if out is None else Path(out)
        runs = {}
        for name, dense in (("dense", True), ("gated", False)):
            pred = out / name
            reports = self.predict(trainer, pred, dense, raw)
            runs[name] = self.evaluate(pred, reports, png=not dense, raw=raw)["aggregate"]
            if not dense:
                runs[name]["gate"] = gate_figures_from_folders(reports, raw / "labelsTs",
                                                               target=self.settings.target_sensitivity)
        return runs

    def calibration_record(self, trainer: str) -> dict:
        """The calibration record in the trained (or installed) fold's checkpoint ({} when it has none)."""
        import torch
        checkpoint = torch.load(self.fold_folder(trainer) / "checkpoint_final.pth", map_location="cpu",
                                weights_only=False)
        return checkpoint.get("gfscreen_calibration") or {}
