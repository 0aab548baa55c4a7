"""Plans for a quick CPU run: a smaller patch (so a small volume has several tiles) and a narrow network.

Used by the demo and the tests, the way a user would edit a plans file for a CPU experiment.
"""
import json
from typing import List, Optional, Sequence

# 4 stages, total stride (4, 8, 8), 8..32 features: narrow enough to train on 2 CPU cores
CPU_ARCH_KWARGS = {
    "n_stages": 4,
    "features_per_stage": [8, 16, 32, 32],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2, 2],
}



def total_stride(strides: Sequence[Sequence[int]]) -> List[int]:
    """Per-axis product of the stage strides, e.g. [[1,1,1],[1,2,2],[2,2,2]] -> [2, 4, 4]."""
    if not strides:
        raise ValueError("strides must list at least one stage")
    out = [1] * len(strides[0])
    for stage in strides:
        if len(stage) != len(out):
            raise ValueError(f"every stage stride needs {len(out)} entries, got {stage}")
        out = [o * int(s) for o, s in zip(out, stage)]
    return out


def shrink_configuration_for_cpu(plans: dict, configuration: str, patch_size: Sequence[int],
                                 arch_kwargs: Optional[dict] = None, batch_size: Optional[int] = None) -> dict:
    """A copy of `plans` whose `configuration` has a smaller patch (and optionally a narrower network).

    Why: nnU-Net caps the patch at the median image shape, which leaves one tile per case and nothing
    to gate; a smaller patch and a narrow network also make CPU training feasible. The patch must be
    divisible by the network's total stride on every axis.
    """
    plans = json.loads(json.dumps(plans))
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise ValueError(f"configuration {configuration!r} not in the plans; available: {sorted(configurations)}")
    config = configurations[configuration]
    parent = config
    while "architecture" not in parent and "inherits_from" in parent:
        parent = configurations[parent["inherits_from"]]
    if "architecture" not in parent:
        raise ValueError(f"configuration {configuration!r} has no architecture, not even by inheritance")
    arch = json.loads(json.dumps(parent["architecture"]))
    arch["arch_kwargs"].update(arch_kwargs or {})
    strides = total_stride(arch["arch_kwargs"]["strides"])
    patch_size = [int(p) for p in patch_size]
    if len(patch_size) != len(strides) or any(p < 1 or p % s for p, s in zip(patch_size, strides)):
        raise ValueError(f"patch_size {patch_size} must have {len(strides)} positive entries divisible by the "
                         f"network's total stride {strides}")
    config.update(patch_size=patch_size, architecture=arch)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        config["batch_size"] = int(batch_size)
    return plans
