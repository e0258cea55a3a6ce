"""DDP on CPU (gloo): 2 ranks at per-rank batch B train exactly like 1 process at batch 2B.

Design: the real training path runs in both cases (our sampler's per-rank shards, kornia views, DINO.step,
the loss, the center all-reduce, DDP's gradient averaging, per-tensor clipping, AdamW, the EMA teacher).
The one thing that differs by design between the two runs is the augmentation: each rank draws its views
from a seed that includes its rank. ``GlobalViewsDINO`` (the test's deterministic-views mode) therefore
gathers the global batch, draws its views once with the rank-0 seed and keeps its own slice, so both runs see
bit-identical views. What remains are float32 summation-order differences: the 2B-row matmuls block
differently from B-row ones, the loss mean is summed in two halves, and DDP averages two half-batch
gradients. Each is a few ulps (~1e-7 relative). Tolerances: 1e-5 relative on the loss (measured ~1e-7),
1e-6 absolute on the center (measured ~1e-8; without the all-reduce a rank's center is off by ~4e-3), and
1e-3 on the relative parameter update ||w_ddp - w_2B|| / ||w_2B - w_0|| after 3 AdamW steps (measured
~2e-5, while the update itself is ~1e-2 in norm). AdamW divides by
sqrt(v), so entries whose true gradient is 0 (the attention key bias) take steps of rounding noise of up to
~lr: they are checked only against that bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy

from sslab.build import build_datamodule, build_method
from sslab.callbacks.common import eval_features
from sslab.data.sampling import EpochShuffleSampler
from sslab.methods.dino import DINO
from sslab.modules.distributed import is_distributed
from tests.conftest import ROOT, TINY

B, STEPS, LR = 8, 3, 1e-3


def key_bias_mask(qkv_bias: torch.Tensor) -> torch.Tensor:
    """The key third of a fused qkv bias. Its true gradient is exactly 0 (softmax(q.(k_j + b)) does not depend
    on b: q.b is the same for every key j), so AdamW, which divides by sqrt(v), turns float rounding noise into
    steps of up to ~lr: those entries legitimately differ between any two runs that sum in another order."""
    d = qkv_bias.numel() // 3
    mask = torch.zeros_like(qkv_bias, dtype=torch.bool)
    mask[d : 2 * d] = True
    return mask


class GlobalViewsDINO(DINO):
    """DINO whose views are drawn from the global batch with a rank-free seed; each rank keeps its slice."""

    def step_seed(self, step: int) -> int:
        return super().step_seed(step) - self.global_rank

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is None or not self.trainer.training:
            return batch
        local = batch["image"]
        images = local
        if is_distributed():
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            images = torch.cat(parts)
        batch = super().on_after_batch_transfer({**batch, "image": images}, dataloader_idx)
        r, n = self.global_rank, local.shape[0]
        batch["image"], batch["views"] = local, [v[r * n : (r + 1) * n] for v in batch["views"]]
        return batch

    def step(self, batch):
        """Also keep the center this rank would get from its own half only (the negative control)."""
        n_global = self.views.num_global
        with torch.no_grad():
            t = self.teacher_head(self.teacher_backbone(torch.cat(batch["views"][:n_global]))).float()
            self.local_center = self.center * self.center_momentum + t.mean(0, keepdim=True) * (
                1 - self.center_momentum
            )
        return super().step(batch)


class Recorder(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir, self.rows = out_dir, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append(
            {
                "loss": outputs["loss"].detach().clone(),
                "center": pl_module.center.clone(),
                "local_center": pl_module.local_center.clone(),
                "index": batch["index"].clone(),
            }
        )

    def on_train_end(self, trainer, pl_module):
        feats = eval_features(trainer, pl_module)  # sharded over ranks and all-gathered under DDP
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(
            {"rows": self.rows, "state": state, "bank": feats["bank"], "bank_labels": feats["bank_labels"]},
            self.out_dir / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
        )


def run(cfg_factory, out_dir, batch_size: int, world: int):
    cfg = cfg_factory(
        f"data.batch_size={batch_size}",
        "method._target_=tests.test_ddp.GlobalViewsDINO",
        "method.warmup_epochs=0",
        "method.base_lr=0.016",  # lr = base_lr x global batch 16 / 256 = 1e-3
        "method.freeze_last_layer_epochs=0",
        # per-rank BatchNorm statistics differ from batch 2B's by design (torch has no SyncBatchNorm on CPUs)
        "method.use_bn_in_head=false",
        "data.eval_bank_size=50",
    )
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm)
    strategy = DDPStrategy(start_method="fork", static_graph=True) if world > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[Recorder(out_dir)],
    )
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    # A forked child inherits OpenMP's state but not its worker threads, and hangs in its first parallel
    # region when the parent already ran one (any earlier test did): fork from a single-threaded parent.
    torch.set_num_threads(1)
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    return init, [torch.load(out_dir / f"rank{r}_of{world}.pt", weights_only=False) for r in range(world)]


@pytest.mark.slow
def test_two_ranks_at_batch_b_equal_one_process_at_2b(tmp_path, tiny_cfg, monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT"):  # Lightning sets them in this process; undone after the test
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    init, (one,) = run(tiny_cfg, tmp_path, 2 * B, world=1)
    _, (r0, r1) = run(tiny_cfg, tmp_path, B, world=2)

    for step in range(STEPS):
        a, x, y = one["rows"][step], r0["rows"][step], r1["rows"][step]
        # the sampler split the global batch: rank 0 has its first half, rank 1 its second
        assert torch.equal(torch.cat([x["index"], y["index"]]), a["index"])
        # loss: each rank's loss is the mean over its half, so the global loss is their average
        ddp_loss = (x["loss"] + y["loss"]) / 2
        assert abs(ddp_loss - a["loss"]) <= 1e-5 * abs(a["loss"]), (step, ddp_loss, a["loss"])
        assert abs(x["loss"] - a["loss"]) > 1e-4 * abs(
            a["loss"]
        )  # a single rank alone is not the global loss
        # center: all-reduced, so the same on both ranks and equal to the 2B center
        assert torch.equal(x["center"], y["center"])
        assert (x["center"] - a["center"]).abs().max() <= 1e-6, step
        # negative control: the center from one rank's half alone is far off
        assert (x["local_center"] - a["center"]).abs().max() > 1e-4

    assert r0["state"].keys() == one["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # ranks in sync, bitwise
    num = den = 0.0
    for k in (k for k in one["state"] if k.startswith(("backbone.", "head."))):
        a, b, start = one["state"][k].double(), r0["state"][k].double(), init[k].double()
        if k.endswith("attn.qkv.bias"):  # the key bias: see key_bias_mask
            keep = ~key_bias_mask(a)
            assert (a - b)[~keep].abs().max() <= 2 * STEPS * LR
            a, b, start = a[keep], b[keep], start[keep]
        num, den = num + (a - b).square().sum(), den + (a - start).square().sum()
    rel = (num / den).sqrt().item()
    assert den.sqrt() > 1e-2 and rel <= 1e-3, rel  # the steps moved the weights; DDP's update equals 2B's

    # k-NN bank features: each rank embedded half, the all-gather gives every rank the same full, ordered bank
    assert torch.equal(r0["bank_labels"], one["bank_labels"]) and torch.equal(r1["bank"], r0["bank"])
    assert torch.allclose(r0["bank"], one["bank"], atol=1e-5)


def test_sampler_shards_the_global_batch_and_resumes_per_rank():
    one = list(EpochShuffleSampler(40, batch_size=8, seed=1))
    ranks = [list(EpochShuffleSampler(40, batch_size=4, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    for g in range(5):  # global batch g of 2 ranks x 4 == batch g of 1 process x 8, in rank order
        assert ranks[0][g * 4 : g * 4 + 4] + ranks[1][g * 4 : g * 4 + 4] == one[g * 8 : g * 8 + 8]
    s = EpochShuffleSampler(40, batch_size=4, seed=1, rank=1, world_size=2)
    s.resume_at(epoch=0, batches_done=3)  # 3 steps done by every rank = 24 samples of the epoch
    assert list(s) == ranks[1][12:]
    assert len(s) == 20 and len(EpochShuffleSampler(42, 4, rank=0, world_size=2)) == 20


@pytest.mark.slow
def test_train_py_ddp_two_processes(tmp_path):
    """The command a user types: 2 gloo processes, both finish, ranks bit-identical at the end."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "train.py",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_steps=3",
        *TINY,
        "data.batch_size=8",
        "data.eval_bank_size=60",
        "data.eval_test_size=40",
        f"paths.output_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] is True
    assert metrics["global_step"] == 3 and "eval/knn_top1" in metrics
    assert len(list(out.glob("*/*/metrics.json"))) == 1  # one run directory for both ranks
