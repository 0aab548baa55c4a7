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
    """Arm by arm, which loss terms are non-zero on a toy batch, and that nothing else changed."""
    from nnunetv2_gfscreen.core.grl import balanced_bce, detection_reward, dice_reward
    from nnunetv2_gfscreen.plans.settings import GFScreenSettings
    from nnunetv2_gfscreen.trainers import (GFScreenTrainer_DenseBalancedCE, GFScreenTrainer_DenseOnly,
                                            GFScreenTrainer_DiceReward, GFScreenTrainer_NoAlphaCE,
                                            GFScreenTrainer_NoDenseMap)

    settings = GFScreenSettings.from_dict({"alpha": 0.5, "clip_eps": 0.2, "beta": 0.04, "dual_clip": 0,
                                           "glance_dense_per_lesion": 0})

    def run(cls):
        t = cls.__new__(cls)  # the hooks need no nnU-Net state
        t.gfscreen = settings
        rewards = t.compute_rewards(pred, gt, valid)
        terms = t.glance_objective(logits, ref, rewards, lesion, groups)
        dense = t.dense_objective(dense_logits, gt, {})
        return rewards, t.grl_alpha(), terms, dense, t.dense_map_weight()

    g = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(8, 1, 4, 4, 4, generator=g) > 0.7, torch.rand(8, 1, 4, 4, 4, generator=g) > 0.8
    gt[[1, 2, 5, 6]] = False  # tiles without lesion: rewards differ within each group of 4
    valid = torch.ones_like(gt)
    logits, lesion = torch.randn(8, generator=g), (torch.rand(8, generator=g) > 0.5).float()
    ref = logits.detach() + 0.3 * torch.randn(8, generator=g)  # the policy has moved away from the reference
    dense_logits = torch.randn(8, 1, 2, 2, 2, generator=g)
    groups = torch.arange(8) // 4
    nonzero = lambda terms, dense, w: {k for k, v in terms.items() if k != "grl_losses" and float(v) != 0} | \
        ({"dense"} if float(dense) * w != 0 else set())  # noqa: E731
    base_r, base_a, base_terms, base_dense, base_w = run(GFScreenTrainer)
    assert torch.equal(base_r, detection_reward(pred, gt, valid)) and base_a == 0.5 and base_w == 1.0
    assert nonzero(base_terms, base_dense, base_w) == {"grl_clip", "grl_kl", "grl_ce", "dense"}
    expected = {  # arm: the loss terms left, everything else as the default
        GFScreenTrainer_DenseOnly: {"dense"},
        GFScreenTrainer_DenseBalancedCE: {"grl_ce", "dense"},
        GFScreenTrainer_NoDenseMap: {"grl_clip", "grl_kl", "grl_ce"},
        GFScreenTrainer_NoAlphaCE: {"grl_clip", "grl_kl", "dense"},
        GFScreenTrainer_DiceReward: {"grl_clip", "grl_kl", "grl_ce", "dense"},
    }
    for arm, left in expected.items():
        r, a, terms, dense, w = run(arm)
        assert nonzero(terms, dense, w) == left, arm.__name__
        assert torch.equal(dense, base_dense)  # the dense map's loss itself is never changed, only its weight
    r, _, terms, _, _ = run(GFScreenTrainer_DiceReward)
    assert torch.equal(r, dice_reward(pred, gt, valid)) and not torch.equal(r, base_r)
    _, a, terms, _, _ = run(GFScreenTrainer_NoAlphaCE)
    assert a == 0.0 and torch.isclose(terms["grl_losses"], base_terms["grl_losses"] - 0.5 * base_terms["grl_ce"])
    _, _, terms, _, _ = run(GFScreenTrainer_DenseBalancedCE)
    assert torch.isclose(terms["grl_ce"], base_terms["grl_ce"])  # the default's CE term, label smoothing included
    assert torch.isclose(terms["grl_losses"], 0.5 * base_terms["grl_ce"])
    assert not torch.isclose(terms["grl_ce"], balanced_bce(logits, lesion))  # the smoothing is on by default


def test_without_the_dense_map_the_select_logit_does_not_start_from_it():
    from nnunetv2_gfscreen.core.glance import build_glance
    glance = build_glance(1, (16, 32, 32), base_features=4)
    assert float(glance.head.weight[0, -2]) == 1.0
    glance.detach_select_logit_from_dense_map()
    assert torch.all(glance.head.weight[0, -2:] == 0) and glance.head.weight.shape[1] > 2  # same shape


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
