"""The model that ships for the demo loads with nnU-Net's own loader and gates a case it never saw."""
import numpy as np
import torch

from nnunetv2_gfscreen.core.gate import Gate, GateRule

from gfscreen_lab.experiments.runner import DEMO_MODEL_DIR, FULL, GFSCREEN_MODEL_FOLDER
from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor
from gfscreen_lab.synthetic.dataset import generate_case

MODEL = DEMO_MODEL_DIR / GFSCREEN_MODEL_FOLDER


def test_shipped_model_carries_its_calibration():
    checkpoint = torch.load(MODEL / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    calibration = checkpoint["gfscreen_calibration"]
    assert checkpoint["trainer_name"] == FULL.trainer
    assert calibration["calibrated"] and calibration["settings"]["target_lesion_sensitivity"] == 0.98
    assert calibration["settings"]["tile_margin"] == 0.25
    assert checkpoint["network_weights"]["gate.threshold"].dtype == torch.float64
    assert Gate.rule_from_state_dict(checkpoint["network_weights"]) == GateRule.from_dict(calibration["rule"])
    assert (MODEL.parent / "MODEL.md").is_file()


def test_shipped_model_gates_a_new_case_and_finds_its_lesion():
    torch.set_num_threads(1)
    # a case of the demo's generator settings with a seed the model never saw, lesions raised as in the demo
    image, label, spacing, _ = generate_case(seed=7, case_index=3, shape=FULL.shape, healthy=False)
    image = np.clip(image.astype(np.float32) + FULL.lesion_boost_hu * (label > 0), -1024, 3071)
    predictor = GFScreenPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                  allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(MODEL), [0], "checkpoint_final.pth")
    seg = predictor.predict_single_npy_array(image[None], {"spacing": list(spacing)}, None, None, False)
    record = predictor.records[-1]
    assert record.tiles_selected < 0.3 * len(record.selected)       # the gate skips most tiles
    gt = label > 0
    dice = 2 * (seg.astype(bool) & gt).sum() / (seg.astype(bool).sum() + gt.sum())
    assert dice > 0.5, f"Dice {dice:.3f} with {record.tiles_selected}/{len(record.selected)} tiles"
