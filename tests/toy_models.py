"""Small GF-Screen networks and predictor set-ups for CPU tests (no nnU-Net files needed)."""
from typing import Sequence, Tuple

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_gfscreen.core.gate import Gate, GateRule
from nnunetv2_gfscreen.core.network import GFScreenNetwork

PATCH = (16, 32, 32)


class MeanIntensityGlance(nn.Module):
    """A Glance with a known rule: select logit = scale * (mean tile intensity - offset).

    The mean is flip-invariant, so mirrored and unmirrored tiles get the same decision.
    """

    def __init__(self, offset: float, scale: float = 10.0):
        super().__init__()
        self.offset = offset
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x.float().mean(dim=tuple(range(1, x.ndim))) - self.offset)


class TiltedGlance(nn.Module):
    """A Glance that is NOT flip-invariant: select logit = scale * (ramp-weighted mean intensity - offset).

    The weights grow linearly along every spatial axis (1 + tilt * position), so a flipped tile scores
    differently. offset and tilt are buffers, so two folds' weights hold two different Glances (tilt 0: the
    plain mean, flip-invariant).
    """

    def __init__(self, offset: float = 0.0, tilt: float = 4.0, scale: float = 10.0):
        super().__init__()
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.register_buffer("tilt", torch.tensor(float(tilt)))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        w = torch.ones(spatial, dtype=torch.float32, device=x.device)
        for d, n in enumerate(spatial):
            ramp = torch.linspace(0, 1, n, device=x.device).view([n if i == d else 1 for i in range(len(spatial))])
            w = w + self.tilt * ramp
        weighted = (x.float() * w).sum(dim=tuple(range(2, x.ndim))).mean(1) / w.sum()
        return self.scale * (weighted - self.offset)


def tiny_focus(in_channels: int = 1, num_classes: int = 2, seed: int = 0) -> PlainConvUNet:
    """A 3-stage PlainConvUNet (total stride 4 per axis) with random but fixed weights."""
    torch.manual_seed(seed)
    net = PlainConvUNet(in_channels, 3, (4, 8, 16), nn.Conv3d, 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), 1, num_classes,
                        1, conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={'eps': 1e-5, 'affine': True},
                        nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True}, deep_supervision=False)
    # make the two classes disagree clearly so argmax comparisons are meaningful
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def toy_network(offset: float = 0.0, threshold: float = 0.0, num_classes: int = 2) -> GFScreenNetwork:
    """Focus + MeanIntensityGlance; `threshold` is the gate's threshold logit."""
    return GFScreenNetwork(tiny_focus(num_classes=num_classes), MeanIntensityGlance(offset), num_classes,
                           GateRule(threshold=threshold)).eval()


def write_rule(checkpoint_file, rule: "GateRule") -> None:
    """Set the gate rule in a checkpoint file's network_weights (what a calibration does, without one)."""
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    Gate.write_rule_into_state_dict(checkpoint["network_weights"], rule)
    torch.save(checkpoint, checkpoint_file)


def toy_plans(patch_size: Sequence[int] = PATCH) -> Tuple[PlansManager, dict]:
    """A minimal plans manager (one 3d_fullres configuration) and dataset.json with labels 0/1."""
    plans = {
        "dataset_name": "Dataset999_Toy", "plans_name": "ToyPlans",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "image_reader_writer": "SimpleITKIO",
        "configurations": {"3d_fullres": {
            "data_identifier": "toy", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch_size), "spacing": [1.0, 1.0, 1.0],
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": {}, "_kw_requires_import": []}}},
    }
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    return PlansManager(plans), dataset_json


def init_predictor(predictor, network: nn.Module, patch_size: Sequence[int] = PATCH, mirror_axes=(0, 1, 2)):
    """manual_initialization with the toy plans (what nnU-Net's trainer does for its final validation)."""
    pm, dataset_json = toy_plans(patch_size)
    predictor.manual_initialization(network, pm, pm.get_configuration("3d_fullres"), None, dataset_json,
                                    "GFScreenTrainer", mirror_axes)
    return predictor


def toy_image(shape: Sequence[int] = (40, 80, 80), bright_corner: Tuple[slice, ...] = None, seed: int = 0) -> torch.Tensor:
    """(1, *shape) float32 noise around 0 with one bright block (+3) so the mean-intensity Glance picks its tiles."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 1, size=(1, *shape)).astype(np.float32)
    if bright_corner is None:
        bright_corner = (slice(0, 20), slice(0, 36), slice(44, 80))
    img[(slice(None), *bright_corner)] += 3.0
    return torch.from_numpy(img)


# ---------------------------------------------------------------------- model folders for CLI tests
def patch_nnunet_paths(monkeypatch, root) -> None:
    """Point nnU-Net's folders at `root` (nnunetv2.paths reads the environment on every use)."""
    for name, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        monkeypatch.setenv(name, str(root / sub))


def make_model_folder(planned: dict, trainer: str, seed: int = 0, fold: int = 0):
    """results/<dataset>/<trainer>__nnUNetPlans__<config>/ with plans.json, dataset.json and fold_<fold>'s
    checkpoint_final.pth holding a randomly initialised GFScreenNetwork (no training)."""
    import json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
    from tests.nnunet_fixtures import CONFIG

    dataset_folder = planned["dataset_folder"]
    model_folder = planned["root"] / "results" / dataset_folder.name / f"{trainer}__nnUNetPlans__{CONFIG}"
    (model_folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    plans = json.loads(planned["plans_file"].read_text())
    (model_folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (model_folder / "dataset.json").write_text((dataset_folder / "dataset.json").read_text())
    pm = PlansManager(plans)
    torch.manual_seed(seed)
    net = GFScreenTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 2,
                                                     enable_deep_supervision=False)
    checkpoint = {"network_weights": net.state_dict(), "trainer_name": trainer,
                  "init_args": {"plans": plans, "configuration": CONFIG, "fold": fold},
                  "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(checkpoint, model_folder / f"fold_{fold}" / "checkpoint_final.pth")
    return model_folder, net
