"""nnU-Net's export (resample logits back, argmax, undo crop and transpose, write) with torch on the logits' device.

Mirrors ``nnunetv2.inference.export_prediction.export_prediction_from_logits`` (without saving probabilities).
The logits are resampled with the plans' ``resampling_fn_probabilities_kwargs`` (order 1, order_z 0 by default)
through the same exact per-axis operators as the preprocessing (see torch_preprocessing). With ``covered_bbox`` only
the part of the volume that selected tiles cover is resampled; everything else is background without any work.
"""
from typing import Callable, List, Optional, Sequence, Union
import warnings

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2_gfscreen.atomic import atomic_path
from nnunetv2_gfscreen.torch_io.preprocessing import SUPPORTED_RESAMPLING_FN, resample_data_torch


def _check_covered_bbox(covered_bbox: Sequence[Sequence[int]], shape: Sequence[int]) -> List[List[int]]:
    box = [[int(a), int(b)] for a, b in covered_bbox]
    if len(box) != len(shape) or any(not 0 <= a <= b <= n for (a, b), n in zip(box, shape)):
        raise ValueError(f'covered_bbox {covered_bbox} must be half-open [start, stop) per axis inside the '
                         f'preprocessed shape {tuple(shape)}')
    return box


def _logits_to_segmentation(logits: torch.Tensor, label_manager: LabelManager) -> torch.Tensor:
    """(K, X, Y, Z) logits -> (X, Y, Z) labels on the logits' device (argmax ties go to the lower index)."""
    if label_manager.has_regions:
        return label_manager.convert_logits_to_segmentation(logits)
    # a running maximum over K: same result as torch.argmax(logits, 0) (strict '>' keeps the first maximum),
    # but elementwise, which is ~10x faster on the CPU than argmax's strided reduction over dim 0
    best, labels = logits[0], torch.zeros(logits.shape[1:], dtype=torch.int16, device=logits.device)
    for k in range(1, logits.shape[0]):
        better = logits[k] > best
        labels[better] = k
        best = torch.maximum(best, logits[k])
    return labels


def _segment_cropped(logits: torch.Tensor, properties: dict, plans_manager: PlansManager,
                     configuration_manager: ConfigurationManager, label_manager: LabelManager,
                     covered_bbox: Optional[List[List[int]]]) -> tuple:
    """Resampled labels of the cropped original geometry: (labels (numpy, sub-block), sub-block bbox)."""
    target_shape = [int(i) for i in properties['shape_after_cropping_and_before_resampling']]
    spacing_transposed = [properties['spacing'][i] for i in plans_manager.transpose_forward]
    current_spacing = list(configuration_manager.spacing)
    if len(current_spacing) < len(target_shape):
        current_spacing = [spacing_transposed[0], *current_spacing]

    fn_name = configuration_manager.configuration['resampling_fn_probabilities']
    kwargs = dict(configuration_manager.configuration['resampling_fn_probabilities_kwargs'])
    if fn_name == SUPPORTED_RESAMPLING_FN and not kwargs.pop('is_seg', False):
        resampled, out_bbox = resample_data_torch(logits, target_shape, current_spacing, spacing_transposed,
                                                  input_bbox=covered_bbox, **kwargs)
    elif covered_bbox is None:  # not re-implemented here: nnU-Net's own function on the CPU, whole volume
        out = configuration_manager.resampling_fn_probabilities(logits.float().cpu(), target_shape,
                                                                current_spacing, spacing_transposed)
        resampled, out_bbox = torch.as_tensor(np.asarray(out)), [[0, n] for n in target_shape]
    else:
        raise NotImplementedError(f"covered_bbox needs resampling_fn_probabilities '{SUPPORTED_RESAMPLING_FN}' "
                                  f"(is_seg False), the plans name '{fn_name}' with {kwargs}")
    labels = _logits_to_segmentation(resampled, label_manager).cpu().numpy()
    return labels, out_bbox


def _write_atomically(segmentation: np.ndarray, properties: dict, plans_manager: PlansManager, file_ending: str,
                      output_file_truncated: str) -> None:
    """Write to a temporary name in the same folder, then rename: no half-written output file ever exists."""
    with atomic_path(output_file_truncated + file_ending, suffix=file_ending) as tmp:
        plans_manager.image_reader_writer_class().write_seg(segmentation, tmp, properties)


def export_logits_torch(logits: torch.Tensor, properties: dict, plans_manager: PlansManager,
                        configuration_manager: ConfigurationManager, dataset_json: Union[dict, str],
                        output_file_truncated: Optional[str],
                        covered_bbox: Optional[Sequence[Sequence[int]]] = None,
                        on_cpu_fallback: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """Segmentation from (K, *preprocessed_shape) logits, in the original image array order; written unless
    ``output_file_truncated`` is None (then ``dataset_json['file_ending']`` is appended).

    covered_bbox: half-open [[start, stop]] per axis in preprocessed voxels, the box of all selected tiles. Voxels
    outside it are background: only original voxels whose interpolation reads the box are resampled (support of the
    resampling weights, which also sets the margin), all others are 0. If the logits' device runs out of memory the
    export is redone on the CPU; the message goes to `on_cpu_fallback` when given, else to warnings.warn.
    """
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    label_manager = plans_manager.get_label_manager(dataset_json)
    logits = torch.as_tensor(logits)
    if logits.ndim != 4 or logits.shape[0] != label_manager.num_segmentation_heads:
        raise ValueError(f'logits must be (K={label_manager.num_segmentation_heads}, X, Y, Z), '
                         f'got shape {tuple(logits.shape)}')
    if covered_bbox is not None:
        covered_bbox = _check_covered_bbox(covered_bbox, logits.shape[1:])

    try:
        labels, out_bbox = _segment_cropped(logits, properties, plans_manager, configuration_manager,
                                            label_manager, covered_bbox)
    except torch.cuda.OutOfMemoryError:
        (on_cpu_fallback or warnings.warn)(f'export_logits_torch: out of memory on {logits.device}; '
                                           f'exporting this case on the CPU')
        if logits.device.type == 'cuda':
            torch.cuda.empty_cache()
        labels, out_bbox = _segment_cropped(logits.cpu(), properties, plans_manager, configuration_manager,
                                            label_manager, covered_bbox)

    dtype = np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16
    segmentation = np.zeros(properties['shape_before_cropping'], dtype=dtype)
    crop = properties['bbox_used_for_cropping']
    segmentation[tuple(slice(c[0] + a, c[0] + b) for c, (a, b) in zip(crop, out_bbox))] = labels
    segmentation = np.ascontiguousarray(segmentation.transpose(plans_manager.transpose_backward))
    if output_file_truncated is not None:
        _write_atomically(segmentation, properties, plans_manager, dataset_json['file_ending'],
                          output_file_truncated)
    return segmentation
