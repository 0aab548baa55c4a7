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
