import pytest

from tests.nnunet_fixtures import make_planned_dataset


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory):
    """Synthetic raw dataset -> nnUNetv2_plan_and_preprocess -> nnUNetv2_gfscreen_plan (shared by the slow tests)."""
    return make_planned_dataset(tmp_path_factory.mktemp("nnunet"))
