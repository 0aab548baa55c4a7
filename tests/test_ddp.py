"""GFScreenTrainer under DDP (`-num_gpus N`), run on the CPU with a gloo process group of two processes.

nnU-Net launches DDP with NCCL on CUDA; the trainer's DDP logic is the same on gloo. Each rank draws its own
batches and groups, runs the trainer's real initialize / train_step / epoch hooks, and saves its weights;
then one process replays rank 0's batches alone. Both ranks must hold identical Focus, policy Glance,
deployed (EMA) Glance and reference Glance; the single-process Glance must start where rank 0 started (same
step-0 Glance loss) yet end elsewhere (the ranks' Glance gradients were averaged).
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.nnunet_fixtures import CONFIG

STEPS_PER_EPOCH = 1


def _make_trainer(plans_file: str, dataset_json_file: str):
    from gfscreen_lab.trainers import GFScreenTrainer_Tiny
    plans = {**json.loads(open(plans_file).read()), "continue_training": False}
    dataset_json = json.loads(open(dataset_json_file).read())
    torch.manual_seed(0)  # same initial weights in every run (DDP would broadcast rank 0's anyway)
    trainer = GFScreenTrainer_Tiny(plans, CONFIG, 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    trainer.gfscreen = dataclasses.replace(trainer.gfscreen, glance_aug_p=0.0)  # no randomness inside a step
    return trainer


def _state(trainer) -> dict:
    net = trainer._gfscreen_network()
    clone = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}
    return {"focus": clone(net.focus), "glance": clone(net.glance), "policy": clone(trainer.policy_glance),
            "reference": clone(trainer.reference_glance)}


def _train(trainer, batches) -> list:
    """Two epochs of STEPS_PER_EPOCH steps through the trainer's own hooks; returns the step outputs."""
    outputs = []
    for epoch in range(2):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        epoch_outputs = []
        for step in range(STEPS_PER_EPOCH):
            torch.manual_seed(1000 + step)
            epoch_outputs.append(trainer.train_step(batches[epoch * STEPS_PER_EPOCH + step]))
        trainer.on_train_epoch_end(epoch_outputs)
        outputs += epoch_outputs
    return outputs


def _rank_worker(rank: int, world_size: int, init_file: str, plans_file: str, dataset_json_file: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        trainer = _make_trainer(plans_file, dataset_json_file)
        assert trainer.is_ddp and trainer.device.type == "cpu" and trainer.batch_size == 1  # global batch 2 split
        np.random.seed(100 + rank)  # each rank draws its own batches and groups (nnU-Net: fresh seeds per process)
        dl_tr, dl_val = trainer.get_dataloaders()
        batches = [next(dl_tr) for _ in range(2 * STEPS_PER_EPOCH)]
        outputs = _train(trainer, batches)
        trainer.on_validation_epoch_start()
        with torch.no_grad():
            val_outputs = [trainer.validation_step(next(dl_val))]
        trainer.on_validation_epoch_end(val_outputs)
        logged = {k: trainer.logger.get_value(k, None) for k in ("mean_reward", "grl_losses", "glance_sensitivity")}
        broadcast = trainer.broadcast_from_rank0({"threshold": 0.25 + rank})
        torch.save({"state": _state(trainer), "batches": batches, "outputs": outputs, "logged": logged,
                    "val_counts": val_outputs[0]["glance_counts"], "broadcast": broadcast},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_same(a: dict, b: dict):
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_two_ranks_keep_focus_and_glances_in_sync(planned_dataset, monkeypatch, tmp_path):
    env = planned_dataset["env"]
    for key in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_compile", "f")
    dataset_json = str(planned_dataset["dataset_folder"] / "dataset.json")
    plans_file = str(planned_dataset["plans_file"])
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), plans_file, dataset_json, str(tmp_path)), nprocs=2,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # groups drawn per rank
    assert not torch.equal(r0["batches"][0]["group_data"], r1["batches"][0]["group_data"])
    # every network identical on both ranks after the steps
    for part in ("focus", "glance", "policy", "reference"):
        _assert_same(r0["state"][part], r1["state"][part])
    # metrics gathered across ranks: both log the mean over both ranks' steps
    for key in ("mean_reward", "grl_losses"):
        both = [float(np.mean([o[key] for o in r["outputs"][:STEPS_PER_EPOCH]])) for r in (r0, r1)]
        assert r0["logged"][key][0] == r1["logged"][key][0] == pytest.approx(np.mean(both))
    tp, fn, _, _ = r0["val_counts"] + r1["val_counts"]
    expected = tp / (tp + fn) if tp + fn else float("nan")
    np.testing.assert_equal([r0["logged"]["glance_sensitivity"][0], r1["logged"]["glance_sensitivity"][0]],
                            [expected, expected])
    assert r0["broadcast"] == r1["broadcast"] == {"threshold": 0.25}

    # one process alone on rank 0's batches: same start, different end
    torch.set_num_threads(1)
    single = _make_trainer(plans_file, dataset_json)
    assert not single.is_ddp
    outputs = _train(single, r0["batches"])
    for key in ("grl_losses", "glance_dense", "mean_reward"):
        assert outputs[0][key] == pytest.approx(r0["outputs"][0][key], rel=1e-5, abs=1e-6), key
    state = _state(single)
    assert any(not torch.allclose(state["policy"][k], r0["state"]["policy"][k], atol=1e-6) for k in state["policy"])
    assert any(not torch.allclose(state["focus"][k], r0["state"]["focus"][k], atol=1e-6) for k in state["focus"])
