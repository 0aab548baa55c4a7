"""GFScreenTrainer's data loaders: nnU-Net's, except that training batches also carry groups of grid tiles per CT.

nnU-Net hard-codes `nnUNetDataLoader` inside `nnUNetTrainer.get_dataloaders`, so the construction is repeated
here with the group loader (group_sampling.py) for training; transforms and augmenters are nnU-Net's.
"""
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2_gfscreen.trainers.group_sampling import GroupDataLoader




def group_transforms(mirror_axes) -> ComposeTransforms:
    """Transforms of the GRL group's sub-volumes: mirroring (if the trainer mirrors) and nnU-Net's clean-up of
    the padding label; no intensity or spatial augmentation, so they look like the tiles seen at inference."""
    mirror = [MirrorTransform(allowed_axes=mirror_axes)] if mirror_axes else []
    return ComposeTransforms(mirror + [RemoveLabelTansform(-1, 0)])


def build_dataloaders(self) -> tuple:
    """(training augmenter, validation augmenter) for the trainer `self`, as `nnUNetTrainer.get_dataloaders`."""
    if self.dataset_class is None:
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
    patch_size = self.configuration_manager.patch_size
    deep_supervision_scales = self._get_deep_supervision_scales()
    rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
        self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
    tr_transforms = self.get_training_transforms(
        patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
        use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
        foreground_labels=self.label_manager.foreground_labels, regions=regions,
        ignore_label=self.label_manager.ignore_label)
    val_transforms = self.get_validation_transforms(
        deep_supervision_scales, is_cascaded=self.is_cascaded,
        foreground_labels=self.label_manager.foreground_labels, regions=regions,
        ignore_label=self.label_manager.ignore_label)
    dataset_tr, dataset_val = self.get_tr_and_val_datasets()
    dl_tr = self.build_group_loader(dataset_tr, initial_patch_size, patch_size, tr_transforms, mirror_axes)
    dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                              oversample_foreground_percent=self.oversample_foreground_percent,
                              transforms=val_transforms,
                              probabilistic_oversampling=self.probabilistic_oversampling)
    n_proc = get_allowed_n_proc_DA()
    if n_proc == 0:
        mt_gen_train, mt_gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
    else:
        pin = self.device.type == "cuda"
        mt_gen_train = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin, 0.002)
        mt_gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None,
                                                  pin, 0.002)
    _ = next(mt_gen_train)
    _ = next(mt_gen_val)
    return mt_gen_train, mt_gen_val


def group_loader(self, dataset_tr, initial_patch_size, patch_size, tr_transforms, mirror_axes) -> GroupDataLoader:
    """GFScreenTrainer's training loader: nnU-Net's Focus batch plus the GRL groups (`self` is the trainer)."""
    return GroupDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                           self.oversample_foreground_percent, self.gfscreen.group_size,
                           self.gfscreen.groups_per_step, self.gfscreen.lesion_share, transforms=tr_transforms,
                           group_transforms=self.get_group_transforms(mirror_axes),
                           probabilistic_oversampling=self.probabilistic_oversampling,
                           tile_step_size=self.gfscreen.tile_step_size,
                           per_lesion=bool(self.gfscreen.lesion_slots_per_lesion),
                           dense_shape=self.dense_weight_shape())
