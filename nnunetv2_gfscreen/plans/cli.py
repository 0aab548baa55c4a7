"""`nnUNetv2_gfscreen_plan`: add a GF-Screen configuration to an existing nnU-Net plans file.

nnU-Net only finds experiment planners inside its own package, so instead of a planner we derive a
configuration that inherits everything (patch, network, preprocessed data) from a planned one and
adds a `gfscreen` block. Train it with `nnUNetv2_train ID 3d_fullres_gfscreen FOLD -tr GFScreenTrainer`.
"""
import argparse
import json
import os
from typing import Optional

from nnunetv2_gfscreen.atomic import write_json
from nnunetv2_gfscreen.plans.settings import PLANS_KEY, GFScreenSettings


def add_gfscreen_configuration(plans_file: str, source_configuration: str = "3d_fullres",
                               target_configuration: Optional[str] = None,
                               overrides: Optional[dict] = None, overwrite: bool = False) -> dict:
    """Write `target_configuration` = {inherits_from: source, gfscreen: {...}} into `plans_file`.

    Returns the GF-Screen settings written. The file is replaced atomically.
    """
    target_configuration = target_configuration or f"{source_configuration}_gfscreen"
    with open(plans_file) as f:
        plans = json.load(f)
    configurations = plans.get("configurations", {})
    if source_configuration not in configurations:
        raise ValueError(f"configuration {source_configuration!r} not in {plans_file}; "
                         f"available: {sorted(configurations)}")
    if target_configuration in configurations and not overwrite:
        raise FileExistsError(f"configuration {target_configuration!r} already exists in {plans_file}; "
                              f"pass --overwrite to replace it")
    settings = GFScreenSettings.from_dict(overrides)
    configurations[target_configuration] = {"inherits_from": source_configuration, PLANS_KEY: settings.to_dict()}
    write_json(plans, plans_file, indent=4)
    return settings.to_dict()


def _parse_overrides(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def plan_entry_point():
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    parser = argparse.ArgumentParser(description="Add a GF-Screen configuration (inheriting from a planned one) "
                                                 "to an nnU-Net plans file.")
    parser.add_argument("-d", type=str, required=True, help="dataset name or id")
    parser.add_argument("-p", type=str, default="nnUNetPlans", help="plans identifier [default: nnUNetPlans]")
    parser.add_argument("-c", type=str, default="3d_fullres", help="configuration to inherit from [default: 3d_fullres]")
    parser.add_argument("-o", type=str, default=None, help="name of the new configuration [default: <c>_gfscreen]")
    parser.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[],
                        help=f"override settings; allowed keys: {', '.join(GFScreenSettings().to_dict())}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing configuration of that name")
    args = parser.parse_args()

    plans_file = os.path.join(str(nnUNet_preprocessed), maybe_convert_to_dataset_name(args.d), args.p + ".json")
    if not os.path.isfile(plans_file):
        raise SystemExit(f"plans file not found: {plans_file}. Run nnUNetv2_plan_and_preprocess first.")
    try:
        written = add_gfscreen_configuration(plans_file, args.c, args.o, _parse_overrides(args.set), args.overwrite)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(str(e)) from None
    print(f"wrote configuration {args.o or args.c + '_gfscreen'} to {plans_file}:")
    print(json.dumps(written, indent=2))
