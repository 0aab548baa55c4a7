"""nnUNetv2_gfscreen_calibrate: (re)calibrate the gate threshold of a trained fold on its validation cases."""
import argparse

import torch

from nnunetv2_gfscreen.core.calibration import calibrate_threshold, describe_calibration, preprocessed_cases
from nnunetv2_gfscreen.core.calibration_store import CALIBRATION_FILE, CHECKPOINT_KEY, save_calibration
from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor


def calibrate_entry_point() -> None:
    """nnUNetv2_gfscreen_calibrate: calibrate the gate threshold of a trained model folder's fold."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    import nnunetv2.paths as paths
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    parser = argparse.ArgumentParser(description="Calibrate the GF-Screen gate threshold of a trained fold on its "
                                                 "validation cases: the highest threshold whose lesion-level "
                                                 "sensitivity (share of lesions with >= 90% of their voxels inside "
                                                 "the selected tiles) reaches the target. Stores the operating curve "
                                                 "and leave-one-case-out figures in the checkpoint and in "
                                                 f"{CALIBRATION_FILE}.")
    parser.add_argument('-d', type=str, required=True, help='Dataset name or ID')
    parser.add_argument('-c', type=str, required=True, help='Configuration, e.g. 3d_fullres')
    parser.add_argument('-tr', type=str, required=False, default='GFScreenTrainer', help='Trainer. Default: GFScreenTrainer')
    parser.add_argument('-p', type=str, required=False, default='nnUNetPlans', help='Plans identifier. Default: nnUNetPlans')
    parser.add_argument('-f', type=str, required=True, help='Fold (0-4 or all)')
    parser.add_argument('-chk', type=str, required=False, default='checkpoint_final.pth',
                        help='Checkpoint to calibrate (its threshold is rewritten). Default: checkpoint_final.pth')
    parser.add_argument('--target_sensitivity', type=float, required=False, default=0.98,
                        help='Lesion-level sensitivity the chosen threshold must reach on the validation cases '
                             '(share of 26-connected lesions with >= 90%% of their voxels in selected tiles). '
                             'Default: 0.98')
    parser.add_argument('--tile_margin', type=float, required=False, default=0.25,
                        help='Fraction of each tile side ignored at each face when counting coverage (coverage by '
                             'the tiles\' central regions; faces on the image border are kept). 0.25: a lesion must '
                             'lie in the middle half of selected tiles, where the Focus sees it with context '
                             '(docs/results.md: at 0 the gated DSC fell 1.8 points below dense). Default: 0.25')
    parser.add_argument('-step_size', type=float, required=False, default=0.5,
                        help='Sliding-window step size used at inference. Default: 0.5')
    parser.add_argument('-device', type=str, default='cuda', required=False, help="'cuda', 'cpu' or 'mps'")
    args = parser.parse_args()
    if args.device not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"-device must be cpu, cuda or mps, got {args.device!r}")
    fold = args.f if args.f == 'all' else int(args.f)

    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    predictor = GFScreenPredictor(tile_step_size=args.step_size, device=torch.device(args.device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, [fold], args.chk)
    dataset_name = maybe_convert_to_dataset_name(args.d)
    preprocessed_base = join(paths.nnUNet_preprocessed, dataset_name)
    data_folder = join(preprocessed_base, predictor.configuration_manager.data_identifier)
    dataset_class = infer_dataset_class(data_folder)
    if fold == 'all':
        keys = dataset_class.get_identifiers(data_folder)
    else:
        splits_file = join(preprocessed_base, 'splits_final.json')
        if not isfile(splits_file):
            raise FileNotFoundError(f"{splits_file} not found: the fold's validation cases are unknown")
        splits = load_json(splits_file)
        if fold >= len(splits):
            raise ValueError(f"fold {fold} is not in {splits_file} ({len(splits)} splits)")
        keys = splits[fold]['val']
    dataset = dataset_class(data_folder, list(keys))
    ids = list(dataset.identifiers)
    result = calibrate_threshold(predictor, preprocessed_cases(dataset, ids), args.target_sensitivity,
                                 tile_margin=args.tile_margin, case_ids=ids)
    path = save_calibration(result, join(model_folder, f'fold_{fold}'), args.chk)
    print(f"{describe_calibration(result)}\nwritten to {path} and {args.chk} (key {CHECKPOINT_KEY!r})")
