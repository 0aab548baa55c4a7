"""The argument parser of nnUNetv2_predict_gfscreen: every option of nnUNetv2_predict, plus the gating options.

`-npp`/`-nps` default to the environment's `nnUNet_npp`/`nnUNet_nps`, as in nnU-Net's `predict_entry_point`
(read when the parser is built, i.e. at each command start).
"""
import argparse
import os

from nnunetv2_gfscreen.predictors.gfscreen_predictor import TORCH_IO_MODES


def env_default(name: str, default: int) -> int:
    """int($name) if set and an integer, else `default`: nnU-Net's `_getDefaultValue` (an unparsable value falls
    back to the default there too)."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def build_parser() -> argparse.ArgumentParser:
    """nnUNetv2_predict's options (same names, aliases and environment defaults; tests/test_cli_parity.py
    compares the two parsers) plus the gating options."""
    p = argparse.ArgumentParser(description='nnU-Net inference with GF-Screen Glance gating: the Focus network only '
                                            'segments the tiles the Glance selects. Takes every argument of '
                                            'nnUNetv2_predict, plus the gating options at the end.')
    p.add_argument('-i', type=str, required=True,
                   help='Input folder with <case>_XXXX<file ending> images (channel numbering as in training).')
    p.add_argument('-o', type=str, required=True, help='Output folder (created if missing); masks are <case><file ending>.')
    p.add_argument('-d', type=str, required=True, help='Dataset name or ID to predict with.')
    p.add_argument('-p', type=str, required=False, default='nnUNetPlans', help='Plans identifier. Default: nnUNetPlans')
    p.add_argument('-tr', type=str, required=False, default='GFScreenTrainer',
                   help='Trainer used for training. Default: GFScreenTrainer')
    p.add_argument('-c', type=str, required=True, help='Configuration, e.g. 3d_fullres.')
    p.add_argument('-f', nargs='+', type=str, required=False, default=(0, 1, 2, 3, 4),
                   help='Folds to ensemble. Default: (0, 1, 2, 3, 4)')
    p.add_argument('-step_size', type=float, required=False, default=0.5,
                   help='Sliding-window step size as a fraction of the patch size (<= 1). Default: 0.5')
    p.add_argument('--disable_tta', action='store_true', required=False, default=False,
                   help='Disable mirroring test-time augmentation (of the selected tiles).')
    p.add_argument('--verbose', action='store_true', help='Print more.')
    p.add_argument('--save_probabilities', action='store_true',
                   help='Also write class probabilities (.npz/.pkl); voxels no selected tile reaches are certain background. '
                        "Exports with nnU-Net's CPU export (whole volume), also when --torch_io is on.")
    p.add_argument('--continue_prediction', '--c', action='store_true',
                   help='Skip cases whose output already exists.')
    p.add_argument('-chk', type=str, required=False, default='checkpoint_final.pth',
                   help='Checkpoint file name. Default: checkpoint_final.pth')
    p.add_argument('-npp', type=int, required=False, default=env_default('nnUNet_npp', 3),
                   help='Background workers (threads) reading and preprocessing the next cases while the current '
                        'one is predicted; 0: in turn. Default: $nnUNet_npp, else 3')
    p.add_argument('-nps', type=int, required=False, default=env_default('nnUNet_nps', 3),
                   help='Background workers (threads) exporting and writing predicted cases while the next one is '
                        'predicted; 0: in turn. Default: $nnUNet_nps, else 3')
    p.add_argument('-prev_stage_predictions', type=str, required=False, default=None,
                   help='Cascades are not supported by GF-Screen; accepted for compatibility only.')
    p.add_argument('-num_parts', type=int, required=False, default=1,
                   help='Number of separate calls that split the cases. Default: 1')
    p.add_argument('-part_id', type=int, required=False, default=0,
                   help='Which part this call predicts (0 .. num_parts - 1). Default: 0')
    p.add_argument('-device', type=str, default='cuda', required=False,
                   help="'cuda', 'cpu' or 'mps'. Select the GPU with CUDA_VISIBLE_DEVICES.")
    p.add_argument('--disable_progress_bar', action='store_true', required=False, default=False,
                   help='Disable progress bars.')
    p.add_argument('--not_on_device', action='store_true', required=False, default=False,
                   help='Keep the result arrays in CPU memory (large cases).')
    p.add_argument('--torch_io', type=str, choices=TORCH_IO_MODES, default='auto',
                   help="Preprocessing and export with torch on the device (nnU-Net's operations, reproduced; the "
                        "export only resamples the box of the selected tiles): 'on', 'off' (nnU-Net's CPU "
                        "functions), or 'auto' (on for -device cuda). Falls back to the CPU per case when GPU "
                        "memory runs out. Default: auto")
    gate = p.add_argument_group('GF-Screen gating')
    gate.add_argument('--threshold', type=float, default=None,
                      help="Gate threshold as a Glance logit (0 is p(select) = 0.5) for all folds, instead of the "
                           "calibrated one; the rest of the calibrated rule (floor, fallback) stays.")
    gate.add_argument('--target_sensitivity', type=float, default=None,
                      help="Re-fit each fold's threshold to this lesion-level sensitivity target from its stored "
                           "calibration cases, by the same rule as the calibration (certified by conformal risk "
                           "control when the cases suffice, else every calibration lesion covered and lowered by the "
                           "leave-one-case-out margin). Prints what the cases certify.")
    gate.add_argument('--max_selection', type=float, default=None,
                      help="The lowest threshold whose selection ratio (share of the calibration cases' tiles sent "
                           "to the Focus, floor included) is <= this. With --target_sensitivity: that target's "
                           "threshold, raised if needed to stay within this.")
    gate.add_argument('--dense', action='store_true',
                      help='Run every tile through the Focus (comparison mode); the Glance does not run.')
    gate.add_argument('--score_tiles', action='store_true',
                      help='With --dense: still score every tile with the Glance, for the reports.')
    gate.add_argument('--no_border_growth', action='store_true',
                      help="Do not predict the tiles beyond a lesion the Focus finds cut by the selection's border "
                           "(default: the model's gate_border_growth setting).")
    gate.add_argument('--tile_batch_size', type=int, default=4, help='Tiles per Focus forward pass. Default: 4')
    gate.add_argument('--report_dir', type=str, default=None,
                      help='Folder for <case>.json reports. Default: <output folder>/gfscreen_reports')
    gate.add_argument('--png', action='store_true',
                      help='Also write <case>.png: CT max projection with selected tiles and predicted lesions.')
    return p
