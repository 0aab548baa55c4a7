"""What a lesion is, everywhere in the package: a 26-connected component of the lesion mask (calibration, the
predictor's report, the evaluation and the case pictures all count lesions this way)."""
from typing import Tuple

import cc3d
import numpy as np

CONNECTIVITY = 26


def label_lesions(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """(component labels, number of lesions) of mask > 0: the one definition of "a lesion" (26-connected) used
    by calibration, the predictor's report, the evaluation and the pictures."""
    labels, n = cc3d.connected_components(np.asarray(mask) > 0, connectivity=CONNECTIVITY, return_N=True)
    return labels, int(n)


# lesion-volume bins (mm^3) in which coverage and sensitivity are reported, so the weakest size is visible:
# < 500 mm^3 (under ~1 cm across), 500-5,000 mm^3 (~1-2 cm), >= 5,000 mm^3 (over ~2 cm)
SIZE_BIN_EDGES_MM3 = (500.0, 5000.0)
SIZE_BINS = ("<500 mm3", "500-5000 mm3", ">=5000 mm3")
SIZE_BIN_KEYS = ("lt500", "500to5000", "ge5000")  # for JSON keys and table columns


def size_bin(volume_mm3) -> np.ndarray:
    """Index into SIZE_BINS of each lesion volume (mm^3)."""
    return np.searchsorted(np.asarray(SIZE_BIN_EDGES_MM3), np.asarray(volume_mm3, np.float64), side="right")
