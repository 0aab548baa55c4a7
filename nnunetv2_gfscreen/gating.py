"""The gate decision, kept pure so the in-network path and GFScreenPredictor agree by construction."""
import torch


def select_tiles(probabilities: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Tiles whose Glance probability p(select) exceeds `threshold` go to the Focus.

    probabilities: (B,) in [0, 1]. Returns a bool mask (B,). A NaN score is never silently
    rejected (a NaN input would otherwise turn into "healthy"): it raises.
    """
    if probabilities.ndim != 1:
        raise ValueError(f"expected Glance probabilities of shape (B,), got {tuple(probabilities.shape)}")
    if torch.isnan(probabilities).any():
        raise ValueError("Glance produced NaN scores; is there NaN in the input image?")
    return probabilities > threshold
