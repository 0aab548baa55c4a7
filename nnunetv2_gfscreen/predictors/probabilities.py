"""Saved probabilities that show the gate's decision: voxels no selected tile covers are certain background.

The gated sliding window leaves all-zero logits where no selected tile reaches; nnU-Net's softmax turns
them into 1/K for every class, which `nnUNetv2_ensemble` or a FROC analysis would read as "undecided".
The gate decided "no lesion" there, so the saved vector becomes one-hot background. The logits are not
changed (a large background logit would move the argmax near the covered region's border after
resampling); the rule acts on the probabilities after nnU-Net's resampling and softmax, so the mask is
exactly nnU-Net's.
"""
import numpy as np
import torch

from batchgenerators.utilities.file_and_folder_operations import save_pickle
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager


def undecided_to_background(probabilities: np.ndarray) -> np.ndarray:
    """In place and returned: every voxel whose probability vector is flat (all K classes equal, which softmax
    gives exactly for equal logits, e.g. the zero logits no selected tile overwrote) becomes (1, 0, ..., 0).

    The argmax there was already background (nnU-Net's argmax breaks ties towards class 0), so the mask
    derived from the probabilities does not change. probabilities: (K, *spatial).
    """
    flat = np.all(probabilities == probabilities[:1], axis=0)
    probabilities[:, flat] = 0
    probabilities[0][flat] = 1
    return probabilities


def export_with_probabilities(logits: torch.Tensor, properties: dict, configuration_manager: ConfigurationManager,
                              plans_manager: PlansManager, dataset_json: dict, output_file_truncated: str,
                              num_threads_torch: int, gated: bool = True) -> None:
    """nnU-Net's `export_prediction_from_logits(..., save_probabilities=True)` (same files: .npz with
    `probabilities`, .pkl, the mask), with `undecided_to_background` applied to the probabilities when the case
    was `gated` (a dense prediction skipped nothing: an exact tie of the Focus's logits stays a tie)."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise NotImplementedError("GF-Screen probabilities: region-based (sigmoid) models are not supported")
    segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, label_manager, properties, return_probabilities=True,
        num_threads_torch=num_threads_torch)
    np.savez_compressed(output_file_truncated + '.npz',
                        probabilities=undecided_to_background(probabilities) if gated else probabilities)
    save_pickle(properties, output_file_truncated + '.pkl')
    rw = plans_manager.image_reader_writer_class()
    rw.write_seg(segmentation, output_file_truncated + dataset_json['file_ending'], properties)
