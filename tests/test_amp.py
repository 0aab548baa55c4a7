"""AMP robustness: a non-finite Glance logit skips the step through nnU-Net's GradScaler instead of raising.

`torch.amp.GradScaler('cpu')` runs the same skip logic as on CUDA (unscale_ finds the inf/NaN gradients,
step() skips that optimiser, update() lowers the scale), so the branch is tested on the CPU.
"""
import copy

import pytest
import torch

from nnunetv2_gfscreen.core.grl import grl_loss
from tests.test_trainer_settings import _trainer


def test_grl_loss_without_value_checks_propagates_instead_of_raising():
    logits = torch.tensor([float("nan"), 0.5, -1.0, 2.0], requires_grad=True)
    args = (logits, torch.zeros(4), torch.tensor([1., 0., 0., 1.]), torch.tensor([1., 0., 0., 1.]),
            torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        grl_loss(*args)  # the checked form, for callers that want an error
    terms = grl_loss(*args, check_values=False)
    assert not torch.isfinite(terms.total)
    terms.total.backward()
    assert not torch.isfinite(logits.grad).all()  # so the GradScaler sees it and skips the step


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


@pytest.fixture
def tiny_trainer(planned_dataset, monkeypatch, tmp_path):
    from gfscreen_lab.trainers import GFScreenTrainer_Tiny

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(GFScreenTrainer_Tiny, planned_dataset, monkeypatch, tmp_path)
    trainer.initialize()
    trainer.dataloader_train, _ = trainer.get_dataloaders()
    return trainer


def _poison_glance(monkeypatch, trainer):
    forward = trainer.policy_glance.forward_dense

    def nan_first_logit(x):
        logits, dense = forward(x)
        return logits + torch.nan * (torch.arange(len(logits)) == 0), dense  # keeps the graph

    monkeypatch.setattr(trainer.policy_glance, "forward_dense", nan_first_logit)
    return lambda: monkeypatch.setattr(trainer.policy_glance, "forward_dense", forward)


def test_non_finite_glance_logit_is_skipped_by_the_grad_scaler_and_logged(tiny_trainer, monkeypatch):
    trainer = tiny_trainer
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.on_train_epoch_start()
    batch = next(trainer.dataloader_train)
    focus, policy = _state(trainer._gfscreen_network().focus), _state(trainer.policy_glance)
    restore = _poison_glance(monkeypatch, trainer)
    bad = trainer.train_step(batch)  # must not raise
    assert not torch.isfinite(torch.as_tensor(bad["grl_losses"]))
    assert _changed(focus, trainer._gfscreen_network().focus), "the Focus's finite gradients should still step"
    assert not _changed(policy, trainer.policy_glance), "the Glance step with NaN gradients must be skipped"
    assert trainer.grad_scaler.get_scale() == 512.0  # update() backed off after the inf/NaN
    restore()
    good = trainer.train_step(batch)
    assert _changed(policy, trainer.policy_glance)  # training goes on
    assert int(trainer.nonfinite_steps) == 1
    trainer.on_train_epoch_end([bad, good])
    log = open(trainer.log_file).read()
    assert "1 of 2 training steps had a non-finite loss" in log
    assert trainer.logger.get_value("grl_losses", step=-1) == pytest.approx(float(good["grl_losses"]), rel=1e-5)


def test_without_grad_scaler_a_non_finite_step_changes_nothing(tiny_trainer, monkeypatch):
    trainer = tiny_trainer
    assert trainer.grad_scaler is None  # the CPU trainer has none
    trainer.on_train_epoch_start()
    batch = next(trainer.dataloader_train)
    focus, policy = _state(trainer._gfscreen_network().focus), _state(trainer.policy_glance)
    momentum = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    _poison_glance(monkeypatch, trainer)
    trainer.train_step(batch)
    assert not _changed(focus, trainer._gfscreen_network().focus) and not _changed(policy, trainer.policy_glance)
    assert trainer.optimizer.state_dict()["state"] == momentum == {}
    assert int(trainer.nonfinite_steps) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations can only be caught on CUDA")
def test_glance_losses_read_no_values_on_the_device():
    from nnunetv2_gfscreen.trainers.glance_training import dense_lesion_loss

    dev = torch.device("cuda")
    logits = torch.randn(8, device=dev, requires_grad=True)
    dense = torch.randn(8, 1, 2, 4, 4, device=dev, requires_grad=True)
    lesion = torch.rand(8, 1, 8, 16, 16, device=dev) > 0.9
    labels, rewards = (torch.arange(8, device=dev) % 3 == 0).float(), torch.rand(8, device=dev).round()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = grl_loss(logits, torch.randn(8, device=dev), rewards, labels, torch.arange(8, device=dev) // 4,
                         check_values=False)
        (terms.total + dense_lesion_loss(dense, lesion)).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
