"""GFScreenPredictor: nnU-Net's predictor with a Glance-gated sliding window.

Only the sliding-window step differs from `nnUNetPredictor`; it lives in core/gated_window.py
(`GatedSlidingWindowMixin`), which the trainer's final validation runs too: the Glance scores every tile
once (batched), the gate decides for the case, then the Focus segments only the selected tiles (batched), with
nnU-Net's Gaussian blending and mirroring TTA on those alone, growing the selection where a predicted lesion
reaches its border. A fold ensemble gates once per case on the folds' mean Glance logit. Saved probabilities are
certain background where no selected tile reached (probabilities.py).

Reading/preprocessing (`preprocess_case`) and export (`export_case`) are separate methods. With
`torch_io` on (the default on CUDA) they run nnU-Net's preprocessing and export with torch on the
predictor's device (`torch_preprocessing`, `torch_export`), and the export resamples only the box of
the selected tiles; otherwise they call nnU-Net's own CPU functions.
"""
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunetv2.inference.export_prediction import export_prediction_from_logits

from nnunetv2_gfscreen.atomic import partial_name
from nnunetv2_gfscreen.core.gate import Gate, GateRule
from nnunetv2_gfscreen.core.gated_window import GatedSlidingWindowMixin
from nnunetv2_gfscreen.core.records import Box
from nnunetv2_gfscreen.nnunet_adapters import PredictorHooks, trainer_lookup_past_nnunet_folder
from nnunetv2_gfscreen.predictors.probabilities import export_with_probabilities
from nnunetv2_gfscreen.torch_io.export import export_logits_torch
from nnunetv2_gfscreen.torch_io.preprocessing import preprocess_case_torch

TORCH_IO_MODES = ('auto', 'on', 'off')


class CaseInputError(ValueError):
    """An input case that cannot be predicted (unreadable, wrong channel count, NaN/inf values)."""


def nifti_nonfinite_count(path: str) -> int:
    """NaN/inf voxels stored in a float NIfTI file (0 for other files and integer NIfTI).

    SimpleITK's NIfTI reader returns NaN voxels as 0, so the reader's array cannot show them; integer
    images (most CTs) cannot hold NaN and are not read a second time.
    """
    if not path.endswith(('.nii', '.nii.gz')):
        return 0
    import nibabel
    img = nibabel.load(path)
    if img.header.get_data_dtype().kind != 'f':
        return 0
    data = np.asanyarray(img.dataobj)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


class GFScreenPredictor(GatedSlidingWindowMixin, PredictorHooks):
    """nnUNetPredictor whose sliding window runs the Focus on Glance-selected tiles only.

    threshold: a logit replacing the calibrated rule's threshold when not None (the rest of the rule stays).
    dense: run every tile through the Focus (for comparison); the Glance does not run unless score_dense.
    border_growth: predict the tiles beyond a lesion cut by the selection's border (None: the plans' setting).
    rule: a GateRule for every case instead of the loaded weights' (calibrated) one.
    tile_batch_size: tiles per Focus forward pass; glance_batch_size: tiles per Glance pass.
    torch_io: 'auto' (torch preprocessing/export on the device when it is CUDA, nnU-Net's CPU functions
    otherwise), 'on' or 'off' (force either; 'on' works on CPU tensors too).
    After each sliding window, a `SlidingWindowRecord` is appended to `self.records`
    (one per fold for an ensemble); `reset_records()` clears it between cases.
    Fold ensembles (`predict_logits_from_preprocessed_data` with several folds) gate once per case: the
    tiles are scored with every fold's Glance, decided on the mean logit by the folds' pooled rule
    (`gate.pool_rules`; `threshold` replaces its threshold), and every fold's Focus runs on that selection.
    """

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device('cuda'),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 threshold: Optional[float] = None, dense: bool = False, tile_batch_size: int = 4,
                 glance_batch_size: int = 8, torch_io: str = 'auto', border_growth: Optional[bool] = None,
                 score_dense: bool = False, rule: Optional[GateRule] = None):
        super().__init__(tile_step_size, use_gaussian, use_mirroring, perform_everything_on_device, device, verbose,
                         verbose_preprocessing, allow_tqdm)
        if tile_batch_size < 1 or glance_batch_size < 1:
            raise ValueError(f"tile_batch_size and glance_batch_size must be >= 1, got {tile_batch_size} and "
                             f"{glance_batch_size}")
        if threshold is not None and not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        if torch_io not in TORCH_IO_MODES:
            raise ValueError(f"torch_io must be one of {TORCH_IO_MODES}, got {torch_io!r}")
        self.torch_io = torch_io
        self.calibration: Optional[dict] = None  # the calibration summary the CLI puts into each report
        self._init_gated_window(threshold, dense, tile_batch_size, glance_batch_size, border_growth, score_dense, rule)

    # ------------------------------------------------------------------ configuration
    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = 'checkpoint_final.pth'):
        """nnU-Net's loader, whose trainer lookup goes straight to the nnUNet_extTrainer folders for a trainer that
        nnU-Net's own folder cannot hold (`nnunet_adapters.trainer_lookup_past_nnunet_folder`): the same class,
        without importing all of nnU-Net's trainer variants first."""
        with trainer_lookup_past_nnunet_folder():
            super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)

    @property
    def use_torch_io(self) -> bool:
        """Whether preprocess_case/export_case use the torch implementations (see `torch_io`)."""
        return self.torch_io == 'on' or (self.torch_io == 'auto' and self.device.type == 'cuda')

    def set_fold_rules(self, rules: Sequence[GateRule]) -> None:
        """Write one gate rule per loaded fold into its weights (`list_of_parameters[i]`, the gate buffers).

        The per-fold weights are reloaded before each fold's sliding window, so this is where a per-fold rule
        chosen at run time (--target_sensitivity, --max_selection) has to go. An ensemble gates with
        `gate.pool_rules` of these."""
        if len(rules) != len(self.list_of_parameters):
            raise ValueError(f"got {len(rules)} rules for {len(self.list_of_parameters)} folds")
        for params, rule in zip(self.list_of_parameters, rules):
            Gate.write_rule_into_state_dict(params, rule)
        self.gfscreen_network.gate.set_rule(rules[0])

    # ------------------------------------------------------------------ case I/O (overridable steps)
    def expected_num_channels(self) -> int:
        return len(self.dataset_json['channel_names'])

    def preprocess_case(self, image_files: List[str], case: str) -> Tuple[torch.Tensor, dict]:
        """Read, validate and preprocess one case. Returns (data (C, *preprocessed shape) float32, properties).

        With `use_torch_io` the data is on the predictor's device (the CPU if that ran out of memory).
        Raises CaseInputError naming the case for unreadable files, a wrong channel count or NaN/inf.
        """
        expected = self.expected_num_channels()
        if len(image_files) != expected:
            raise CaseInputError(f"case {case}: expected {expected} channel file(s) "
                                 f"({self.dataset_json['channel_names']}), got {len(image_files)}: {image_files}")
        rw = self.plans_manager.image_reader_writer_class()
        try:
            image, properties = rw.read_images(image_files)
        except Exception as e:  # readers raise anything from RuntimeError to OSError
            raise CaseInputError(f"case {case}: could not read {image_files}: {type(e).__name__}: {e}") from e
        if image.shape[0] != expected:
            raise CaseInputError(f"case {case}: image has {image.shape[0]} channels, the model expects {expected}")
        n_bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        n_bad = n_bad or sum(nifti_nonfinite_count(f) for f in image_files)
        if n_bad:
            raise CaseInputError(f"case {case}: image contains {n_bad} NaN/inf voxel(s); refusing to predict")
        if self.use_torch_io:
            notes = []
            data, properties = preprocess_case_torch(image, properties, self.plans_manager, self.configuration_manager,
                                                     self.dataset_json, self.device, on_cpu_fallback=notes.append)
            if notes:
                print(f"case {case}: out of memory on {self.device} while preprocessing; preprocessed on the CPU")
            return data, properties
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
        data, _, properties = preprocessor.run_case_npy(image, None, properties, self.plans_manager,
                                                        self.configuration_manager, self.dataset_json)
        data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
        return data, properties

    def export_case(self, logits: torch.Tensor, properties: dict, output_file_truncated: str,
                    save_probabilities: bool = False, num_threads_torch: int = 1,
                    covered_bbox: Optional[Box] = None, case: Optional[str] = None) -> str:
        """Resample, argmax and write the mask (and probabilities) under a temporary name, then rename.

        logits: (K, *preprocessed shape). A failure leaves no partial output file. Returns the path of the mask.
        With `use_torch_io` and no probabilities, torch export on the predictor's device (CPU on OOM);
        covered_bbox (`selected_tiles_bbox`, preprocessed voxels) limits it to the selected tiles' box, voxels
        outside are background. Otherwise nnU-Net's export (on the CPU, whole volume; num_threads_torch threads);
        saved probabilities are certain background where no selected tile reached (probabilities.py).
        """
        return self.export_case_and_mask(logits, properties, output_file_truncated, save_probabilities,
                                         num_threads_torch, covered_bbox, case)[0]

    def export_case_and_mask(self, logits: torch.Tensor, properties: dict, output_file_truncated: str,
                             save_probabilities: bool = False, num_threads_torch: int = 1,
                             covered_bbox: Optional[Box] = None,
                             case: Optional[str] = None) -> Tuple[str, Optional[np.ndarray]]:
        """`export_case`, also returning the written mask in the reader's array order when the export had it in
        memory (the torch export), else None (nnU-Net's export writes it without returning it)."""
        if self.use_torch_io and not save_probabilities:
            case = case or os.path.basename(output_file_truncated)
            notes = []
            mask = export_logits_torch(logits.to(self.device), properties, self.plans_manager,
                                       self.configuration_manager, self.dataset_json, output_file_truncated,
                                       covered_bbox=covered_bbox, on_cpu_fallback=notes.append)
            if notes:
                print(f"case {case}: out of memory on {self.device} while exporting; exported on the CPU")
            return output_file_truncated + self.dataset_json['file_ending'], mask
        return self._export_case_nnunet(logits, properties, output_file_truncated, save_probabilities,
                                        num_threads_torch), None

    def _export_case_nnunet(self, logits: torch.Tensor, properties: dict, output_file_truncated: str,
                            save_probabilities: bool, num_threads_torch: int) -> str:
        """nnU-Net's export_prediction_from_logits (with probabilities: `export_with_probabilities`), written
        under a temporary name and then renamed."""
        ending = self.dataset_json['file_ending']
        folder, name = os.path.split(output_file_truncated)
        tmp_truncated = os.path.join(folder, partial_name(name))  # the files are .<name>.partial..{.npz,.pkl,ending}
        moves = [(tmp_truncated + '.npz', output_file_truncated + '.npz'),
                 (tmp_truncated + '.pkl', output_file_truncated + '.pkl')] if save_probabilities else []
        moves.append((tmp_truncated + ending, output_file_truncated + ending))  # the mask last
        try:
            if save_probabilities:
                export_with_probabilities(logits, properties, self.configuration_manager, self.plans_manager,
                                          self.dataset_json, tmp_truncated, num_threads_torch, gated=not self.dense)
            else:
                export_prediction_from_logits(logits, properties, self.configuration_manager, self.plans_manager,
                                              self.dataset_json, tmp_truncated, False, num_threads_torch)
            for src, dst in moves:
                os.replace(src, dst)
        except BaseException:
            for src, _ in moves:
                if os.path.isfile(src):
                    os.remove(src)
            raise
        return output_file_truncated + ending
