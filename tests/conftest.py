import os

import pytest
import torch

from gfscreen_lab.ext_trainer_env import ENV_VAR, lab_environment
from tests.nnunet_fixtures import make_planned_dataset

# The tests load models of the lab's short trainers in this process too (GFScreenTrainer_Tiny, the demo model's
# GFScreenTrainer_DemoLong): nnU-Net's lookup here must search the lab's folder after the product's.
os.environ[ENV_VAR] = lab_environment(os.environ)[ENV_VAR]


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory):
    """Synthetic raw dataset -> nnUNetv2_plan_and_preprocess -> nnUNetv2_gfscreen_plan (shared by the slow tests)."""
    return make_planned_dataset(tmp_path_factory.mktemp("nnunet"))


@pytest.fixture(scope="session")
def trained_fold(planned_dataset):
    """GFScreenTrainer_Tiny trained by nnUNetv2_train (killed twice and resumed with --c; e2e_training.py)."""
    from tests.e2e_training import train_with_crashes
    return train_with_crashes(planned_dataset)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (predictions compared bit for bit, and the CI machine has 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
