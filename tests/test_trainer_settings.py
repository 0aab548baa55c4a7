"""GFScreenTrainer construction: settings come from the plans; unsupported set-ups are refused up front."""
import copy
import dataclasses
import json

import pytest
import torch

from nnunetv2_gfscreen.trainers import GFScreenTrainer, GFScreenTrainer_Group4
from tests.nnunet_fixtures import CONFIG


def _trainer(cls, planned_dataset, monkeypatch, tmp_path, group_size_in_plans=None):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))  # nnU-Net reads its paths from the environment lazily
    monkeypatch.setenv("nnUNet_preprocessed", str(planned_dataset["root"] / "preprocessed"))
    plans = {**json.loads(planned_dataset["plans_file"].read_text()), "continue_training": False}
    if group_size_in_plans is not None:
        plans["configurations"][CONFIG]["gfscreen"]["group_size"] = group_size_in_plans
    dataset_json = json.loads((planned_dataset["dataset_folder"] / "dataset.json").read_text())
    return cls(plans, CONFIG, 0, dataset_json, torch.device("cpu"))


def test_settings_come_from_plans_and_variant_overrides(planned_dataset, monkeypatch, tmp_path):
    plain = _trainer(GFScreenTrainer, planned_dataset, monkeypatch, tmp_path, group_size_in_plans=6)
    assert plain.gfscreen.group_size == 6  # from the plans' gfscreen block
    group4 = _trainer(GFScreenTrainer_Group4, planned_dataset, monkeypatch, tmp_path, group_size_in_plans=6)
    assert group4.gfscreen.group_size == 4 and group4.gfscreen.alpha == 0.1  # the variant wins for its key only


def test_variant_cannot_override_network_settings(planned_dataset, monkeypatch, tmp_path):
    class Bad(GFScreenTrainer):
        settings_overrides = {"glance_input_scale": 0.25}

    with pytest.raises(ValueError, match="glance_input_scale"):
        _trainer(Bad, planned_dataset, monkeypatch, tmp_path)

    class Bound(GFScreenTrainer):
        settings_overrides = {"glance_logit_bound": 8.0}

    with pytest.raises(ValueError, match="glance_logit_bound"):
        _trainer(Bound, planned_dataset, monkeypatch, tmp_path)


def test_the_logit_bound_comes_from_the_plans(planned_dataset):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = json.loads(planned_dataset["plans_file"].read_text())
    for bound in (0.0, 6.0):
        plans["configurations"][CONFIG]["gfscreen"]["glance_logit_bound"] = bound
        pm = PlansManager(plans)
        net = GFScreenTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 2, True)
        assert net.glance.logit_bound == bound


def test_ablation_arms_change_only_their_hook():
    from nnunetv2_gfscreen.core.grl import balanced_bce, detection_reward, dice_reward
    from nnunetv2_gfscreen.trainers import (GFScreenTrainer_BalancedCE, GFScreenTrainer_DiceReward,
                                            GFScreenTrainer_NoAlphaCE, GFScreenTrainer_PlainCE)

    class Settings:  # what the hooks read
        alpha, clip_eps, beta, dual_clip, glance_label_smoothing = 0.5, 0.2, 0.04, 0.0, 0.0

    def run(cls):
        t = cls.__new__(cls)  # the hooks need no nnU-Net state
        t.gfscreen = Settings()
        rewards = t.compute_rewards(pred, gt, valid)
        return rewards, t.grl_alpha(), t.glance_objective(logits, logits.detach(), rewards, lesion, groups)

    g = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(8, 1, 4, 4, 4, generator=g) > 0.7, torch.rand(8, 1, 4, 4, 4, generator=g) > 0.8
    valid = torch.ones_like(gt)
    logits, lesion = torch.randn(8, generator=g), (torch.rand(8, generator=g) > 0.5).float()
    groups = torch.arange(8) // 4
    base_r, base_a, base_terms = run(GFScreenTrainer)
    assert torch.equal(base_r, detection_reward(pred, gt, valid)) and base_a == 0.5
    r, _, _ = run(GFScreenTrainer_DiceReward)
    assert torch.equal(r, dice_reward(pred, gt, valid)) and not torch.equal(r, base_r)
    r, a, terms = run(GFScreenTrainer_NoAlphaCE)
    assert torch.equal(r, base_r) and a == 0.0
    assert torch.isclose(terms["grl_losses"], base_terms["grl_losses"] - 0.5 * base_terms["grl_ce"])
    _, _, terms = run(GFScreenTrainer_PlainCE)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, lesion)
    assert torch.equal(terms["grl_losses"], expected) and terms["grl_kl"] == 0
    _, _, terms = run(GFScreenTrainer_BalancedCE)
    assert torch.equal(terms["grl_losses"], balanced_bce(logits, lesion))


def test_train_step_trains_focus_on_nnunets_batch_and_glance_on_the_group(planned_dataset, monkeypatch, tmp_path):
    from gfscreen_lab.trainers import GFScreenTrainer_Tiny

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(GFScreenTrainer_Tiny, planned_dataset, monkeypatch, tmp_path)
    trainer.initialize()
    dl_tr, _ = trainer.get_dataloaders()
    batch = next(dl_tr)
    n = trainer.gfscreen.group_size * trainer.gfscreen.groups_per_step
    assert batch["data"].shape[0] == trainer.batch_size and batch["group_data"].shape[0] == n
    assert [t.shape[0] for t in batch["target"]] == [trainer.batch_size] * len(batch["target"])  # deep supervision
    assert batch["group_target"].shape == (n, 1, *batch["group_data"].shape[2:])
    # per-lesion dense weights at the shape of the policy Glance's dense map (glance_dense_per_lesion on)
    dense = trainer.policy_glance.forward_dense(batch["group_data"][:1])[1]
    assert batch["group_dense_weight"].shape == (n, 1, *dense.shape[2:])
    net = trainer._gfscreen_network()
    seen = {}
    loss, glance = trainer.loss, trainer.policy_glance.forward_dense
    # no intensity augmentation here, so that the Glance's input can be compared with the group
    monkeypatch.setattr(trainer, "gfscreen", dataclasses.replace(trainer.gfscreen, glance_aug_p=0.0))
    deployed_before = copy.deepcopy(net.glance.state_dict())

    def recording_loss(output, target):
        seen["seg"] = target[0].clone()
        return loss(output, target)

    def recording_glance(x):
        seen["glance"] = x.clone()
        return glance(x)

    monkeypatch.setattr(trainer, "loss", recording_loss)
    monkeypatch.setattr(trainer.policy_glance, "forward_dense", recording_glance)
    trainer.network.train()
    out = trainer.train_step(batch)
    assert torch.equal(seen["seg"], batch["target"][0])           # the Focus's loss saw nnU-Net's batch
    assert torch.equal(seen["glance"], batch["group_data"])       # the policy Glance was trained on the group
    # the deployed Glance moved towards the policy (EMA), and the policy is not the deployed module
    assert trainer.policy_glance is not net.glance
    moved = [not torch.equal(deployed_before[k], v) for k, v in net.glance.state_dict().items()]
    assert any(moved)
    assert out["glance_dense"] > 0
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values())


def test_a_variant_without_a_docstring_initializes(planned_dataset, monkeypatch, tmp_path):
    from gfscreen_lab.trainers import GFScreenTrainer_Tiny

    class NoDocstring(GFScreenTrainer_Tiny):
        pass

    trainer = _trainer(NoDocstring, planned_dataset, monkeypatch, tmp_path)
    trainer.initialize()  # the settings log line names the trainer; it used to index the docstring's first line
    assert trainer.was_initialized
