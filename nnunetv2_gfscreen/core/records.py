"""What a gated sliding window did: one `SlidingWindowRecord` per case and fold (reports, figures and the torch
export's box read them)."""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

Box = List[List[int]]  # [[z0, z1], [y0, y1], [x0, x1]], half-open


@dataclass
class SlidingWindowRecord:
    """What one gated sliding window did (one case, one fold's weights).

    bboxes are tile boxes in preprocessed (unpadded) voxel coordinates, half-open and clipped. scores are Glance
    logits (empty when a dense run did not score); threshold is in logit units. selected is what the Focus
    predicted: the gate's decision (threshold, floor, fallback; `rule`, `tiles_by_floor`, `fallback`) plus the
    tiles border growth added (`grown`). In a fold ensemble every fold's record holds the case's shared
    decision (scores: the folds' mean logit, the pooled rule); the first fold's record carries the Glance time
    of all folds, the others 0.
    """
    image_shape: Tuple[int, ...]
    bboxes: List[Box] = field(default_factory=list)
    scores: List[float] = field(default_factory=list)
    selected: List[bool] = field(default_factory=list)
    grown: List[bool] = field(default_factory=list)
    threshold: float = float("nan")
    rule: Optional[dict] = None
    tiles_by_floor: int = 0
    fallback: bool = False
    tiles_by_fallback: int = 0
    statistic: float = float("nan")
    dense: bool = False
    glance_seconds: float = 0.0
    focus_seconds: float = 0.0

    @property
    def tiles_selected(self) -> int:
        return int(sum(self.selected))

    @property
    def tiles_grown(self) -> int:
        return int(sum(self.grown))


def selected_tiles_bbox(records: Sequence[SlidingWindowRecord]) -> Optional[Box]:
    """Half-open box around every tile any fold selected, in unpadded preprocessed voxels (the logits' frame).

    None when a record is dense (everything is predicted, nothing to skip); [[0, 0]] * 3 when no tile was
    selected. The record boxes are already unpadded (see `_make_record`), so no padding offset applies here.
    """
    if not records:
        raise ValueError("no sliding-window record: run the sliding window of this case first")
    if any(r.dense for r in records):
        return None
    shape = records[0].image_shape
    if any(r.image_shape != shape for r in records):
        raise ValueError(f"folds predicted different shapes: {[r.image_shape for r in records]}")
    boxes = [b for r in records for b, keep in zip(r.bboxes, r.selected) if keep]
    if not boxes:
        return [[0, 0] for _ in shape]
    return [[min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)] for d in range(len(shape))]
