"""`nnUNetv2_gfscreen_retrofit`: add a Glance to a trained nnU-Net model folder, leaving its Focus as it is.

    nnUNetv2_gfscreen_retrofit -d D -c 3d_fullres -f 0 -tr nnUNetTrainer [-p nnUNetPlans]

checks the source model (checkpoint present, no cascade, no regions, plans that match the preprocessed
data), then runs nnU-Net's own `run_training` with `-tr GFScreenTrainer_Retrofit` (or `-gtr`) and the
source checkpoint as `-pretrained_weights`. The result is an ordinary GF-Screen model folder,
`<gtr>__<plans>__<gc>/fold_F`, for `nnUNetv2_predict` and `nnUNetv2_predict_gfscreen`. GF-Screen settings come
from the `gfscreen` block of the configuration it trains in (`-gc`, default `-c`; defaults when there is none):
`nnUNetv2_gfscreen_plan -d D -c 3d_fullres --set ...` then `-gc 3d_fullres_gfscreen` uses yours.
"""
import argparse
import json
import multiprocessing
import os
from typing import Optional

import torch

CHECKED_PLANS_KEYS = ("foreground_intensity_properties_per_channel", "transpose_forward", "transpose_backward")
# configuration keys that neither the Focus's output nor the preprocessed data depend on
IGNORED_CONFIGURATION_KEYS = ("gfscreen", "batch_size", "inherits_from")


class RetrofitError(ValueError):
    """A model folder the retrofit cannot use; the message says why and what to do."""


def _configuration(plans: dict, name: str, where: str) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if name not in plans.get("configurations", {}):
        raise RetrofitError(f"configuration {name!r} is not in {where}; available: {sorted(plans['configurations'])}")
    configuration = PlansManager(plans).get_configuration(name)
    if configuration.previous_stage_name is not None:
        raise RetrofitError(f"configuration {name!r} is a cascade stage (previous stage "
                            f"{configuration.previous_stage_name!r}); GF-Screen does not support cascades")
    return {k: v for k, v in configuration.configuration.items() if k not in IGNORED_CONFIGURATION_KEYS}


def check_source_model(results_dataset_folder: str, preprocessed_dataset_folder: str, trainer: str, plans: str,
                       configuration: str, fold: str, checkpoint_name: str = "checkpoint_final.pth",
                       gfscreen_configuration: Optional[str] = None) -> str:
    """Path of the source checkpoint, after checking that the retrofit can use the model; RetrofitError if not."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2_gfscreen.trainers.pretrained import is_gfscreen_state_dict

    model = os.path.join(results_dataset_folder, f"{trainer}__{plans}__{configuration}")
    fold_folder = os.path.join(model, f"fold_{fold}")
    checkpoint = os.path.join(fold_folder, checkpoint_name)
    if not os.path.isdir(model):
        raise RetrofitError(f"no trained model folder {model} (check -d, -tr, -p, -c)")
    if not os.path.isfile(checkpoint):
        raise RetrofitError(f"missing checkpoint {checkpoint}: finish training fold {fold} first "
                            f"(or pass -chk checkpoint_best.pth)")
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(model, name)):
            raise RetrofitError(f"{model} lacks {name}; is it an nnU-Net model folder?")
    with open(os.path.join(model, "plans.json")) as f:
        source_plans = json.load(f)
    with open(os.path.join(model, "dataset.json")) as f:
        source_dataset = json.load(f)
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False).get("network_weights")
    if weights is None:
        raise RetrofitError(f"{checkpoint} has no network_weights; is it an nnU-Net checkpoint?")
    if is_gfscreen_state_dict(weights):
        raise RetrofitError(f"{checkpoint} is already a GF-Screen model (it has a Glance)")
    if LabelManager(source_dataset["labels"], source_dataset.get("regions_class_order")).has_regions:
        raise RetrofitError(f"{model} is trained on regions; GF-Screen needs label-based training")
    source = _configuration(source_plans, configuration, f"{model}/plans.json")

    plans_file = os.path.join(preprocessed_dataset_folder, f"{plans}.json")
    if not os.path.isfile(plans_file):
        raise RetrofitError(f"plans file {plans_file} not found: the retrofit trains on the preprocessed training "
                            f"cases (nnUNetv2_plan_and_preprocess with the model's plans)")
    with open(plans_file) as f:
        target_plans = json.load(f)
    target_name = gfscreen_configuration or configuration
    target = _configuration(target_plans, target_name, plans_file)
    differing = sorted(k for k in set(source) | set(target) if source.get(k) != target.get(k))
    differing += [k for k in CHECKED_PLANS_KEYS if source_plans.get(k) != target_plans.get(k)]
    with open(os.path.join(preprocessed_dataset_folder, "dataset.json")) as f:
        if json.load(f).get("labels") != source_dataset.get("labels"):
            differing.append("labels (dataset.json)")
    if differing:
        raise RetrofitError(f"plans mismatch: the model was trained with {model}/plans.json, configuration "
                            f"{configuration!r}, but {plans_file} configuration {target_name!r} differs in {differing}; "
                            f"retrofit needs the plans (and preprocessed data) the model was trained with")
    return checkpoint


def find_retrofit_trainer(name: str) -> type:
    """The `-gtr` class, found as `nnUNetv2_train -tr` finds trainers (ours, nnU-Net's, nnUNet_extTrainer's);
    SystemExit naming the problem unless it is a GFScreenTrainer_Retrofit variant."""
    import nnunetv2_gfscreen.trainers as gfscreen_trainers  # heavy: imported when the command runs
    from nnunetv2_gfscreen.trainers.retrofit import GFScreenTrainer_Retrofit
    trainer_class = getattr(gfscreen_trainers, name, None)
    if trainer_class is None:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        try:
            trainer_class = recursive_find_trainer_class_by_name(name)
        except Exception:  # nnU-Net raises a bare RuntimeError with its search path
            trainer_class = None
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, GFScreenTrainer_Retrofit)):
        raise SystemExit(f"-gtr {name} is not a GFScreenTrainer_Retrofit variant (searched our trainers, nnU-Net's "
                         f"and the folders in nnUNet_extTrainer)")
    return trainer_class


def retrofit_entry_point():
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.run.run_training import run_training
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    parser = argparse.ArgumentParser(description="Train a GF-Screen Glance for an already trained nnU-Net model "
                                                 "(its network becomes the frozen Focus).")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration of the trained model, e.g. 3d_fullres")
    parser.add_argument("-f", required=True, help="fold of the trained model (0-4 or all)")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer of the trained model [nnUNetTrainer]")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier [nnUNetPlans]")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint of the trained model to use")
    parser.add_argument("-gtr", default="GFScreenTrainer_Retrofit", help="GF-Screen retrofit trainer [%(default)s]")
    parser.add_argument("-gc", default=None, help="configuration to train in (its gfscreen block gives the settings; "
                                                  "must match -c in everything else) [default: -c]")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="as nnUNetv2_train")
    parser.add_argument("--c", action="store_true", dest="continue_training", help="continue an interrupted retrofit")
    args = parser.parse_args()

    find_retrofit_trainer(args.gtr)
    dataset = maybe_convert_to_dataset_name(args.d)
    try:
        checkpoint = check_source_model(os.path.join(str(nnUNet_results), dataset),
                                        os.path.join(str(nnUNet_preprocessed), dataset), args.tr, args.p, args.c,
                                        args.f, args.chk, args.gc)
    except RetrofitError as e:
        raise SystemExit(f"nnUNetv2_gfscreen_retrofit: {e}") from None
    if args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    print(f"GF-Screen retrofit: Focus from {checkpoint}")
    run_training(dataset, args.gc or args.c, args.f, args.gtr, args.p,
                 pretrained_weights=None if args.continue_training else checkpoint,
                 continue_training=args.continue_training,
                 device=torch.device(args.device))
