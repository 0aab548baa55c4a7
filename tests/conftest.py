import pytest

from tests.nnunet_fixtures import make_planned_dataset


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory):
    """Synthetic raw dataset -> nnUNetv2_plan_and_preprocess -> nnUNetv2_gfscreen_plan (shared by the slow tests)."""
    return make_planned_dataset(tmp_path_factory.mktemp("nnunet"))


@pytest.fixture(scope="session")
def trained_fold(planned_dataset):
    """GFScreenTrainer_Tiny trained by nnUNetv2_train (killed twice and resumed with --c; e2e_training.py)."""
    from tests.e2e_training import train_with_crashes
    return train_with_crashes(planned_dataset)
