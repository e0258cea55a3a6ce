"""data=streaming (issue 16, item 6) on real litdata shards written to disk by ``python -m sslab.dataset_builders.streaming_shards``:
the same tensors as data=imagefolder, rank sharding by chunks, exact resume (as tests/test_resume.py), and a
real 2-process gloo DDP run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from sslab.data import ImageFolderDataModule
from sslab.data.streaming import ChunkShuffleSampler, StreamingDataModule
from sslab.dataset_builders.streaming_shards import convert
from sslab.errors import SSLabError
from tests.conftest import CONF, ROOT
from tests.test_unlabelled import class_tree, flat_folder

SIZES = dict(image_size=16, local_crop_size=8, patch_size=4, channels=3, mean=[0.5] * 3, std=[0.25] * 3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """(image tree, shards): 3 classes x 24 PNGs, ~3 samples per chunk so that there are many chunks."""
    root = tmp_path_factory.mktemp("streaming")
    tree = class_tree(root / "images", 24)
    convert(str(tree), str(root / "shards"), image_size=16, chunk_bytes="8KB")
    return tree, root / "shards"


def streaming_cfg(tmp_path: Path, shards: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "data=streaming",
                f"data.path={shards}",
                "data.image_size=16",
                "data.local_crop_size=8",
                "data.patch_size=4",
                "data.batch_size=8",
                "data.num_workers=0",
                "data.shuffle_window=16",
                "++backbone.depth=2",
                "method.out_dim=64",
                "method.hidden_dim=32",
                "method.bottleneck_dim=16",
                "method.views.num_local=2",
                "logger=[csv]",
                "callbacks=[knn,linear_probe]",
                "trainer.enable_progress_bar=false",
                "trainer.log_every_n_steps=1",
                "final_eval.baselines=false",
                f"paths.output_dir={tmp_path}",
                *overrides,
            ],
        )


def test_shards_hold_what_imagefolder_yields(shards, tmp_path):
    tree, out = shards
    dm = StreamingDataModule(path=str(out), name="streaming", **SIZES)
    dm.setup()
    folder = ImageFolderDataModule(path=str(tree), name="imagefolder", **SIZES)
    folder.setup()
    assert len(dm.train_set) == len(folder.train_set) == 66 and len(dm.test_set) == 6
    assert len(dm.train_set.chunk_sizes) > 10  # many chunks on disk
    for i in (0, 17, 65):
        a, b = dm.train_set[i], folder.train_set[i]
        assert a["image"].dtype == torch.uint8 and a["image"].shape == (4, 23, 23)
        assert torch.equal(a["image"], b["image"]) and int(a["label"]) == int(b["label"])
    assert dm.class_names == ["class0", "class1", "class2"] and dm.eval_off_reason is None
    assert len(list(dm.eval_dataloaders()[0].dataset)) == 66


def test_png_encoding_is_lossless_and_unlabelled_trees_have_no_val(tmp_path):
    flat = flat_folder(tmp_path / "flat", 6)
    convert(str(flat), str(tmp_path / "raw"), image_size=16)
    convert(str(flat), str(tmp_path / "png"), image_size=16, encoding="png")
    raw = StreamingDataModule(path=str(tmp_path / "raw"), name="s", **SIZES)
    png = StreamingDataModule(path=str(tmp_path / "png"), name="s", **SIZES)
    raw.setup(), png.setup()
    assert all(torch.equal(raw.train_set[i]["image"], png.train_set[i]["image"]) for i in range(6))
    assert not (tmp_path / "raw" / "val").exists() and int(raw.train_set[0]["label"]) == -1
    with pytest.raises(SSLabError, match="have no labels: k-NN and linear probe are off"):
        raw.eval_dataloaders()
    with pytest.raises(SSLabError, match=r"load_size=23, but data\.load_size=40"):
        StreamingDataModule(path=str(tmp_path / "raw"), name="s", load_size=40, **SIZES).setup()


def test_convert_command_line_and_its_refusals(tmp_path):
    flat = flat_folder(tmp_path / "flat", 4)
    cmd = [
        sys.executable,
        "-m",
        "sslab.dataset_builders.streaming_shards",
        f"src={flat}",
        f"out={tmp_path / 'out'}",
        "image_size=16",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote train 4 images" in res.stdout and (tmp_path / "out" / "train" / "index.json").is_file()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)  # out exists now
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: out=")
    assert "Traceback" not in res.stderr


def test_ranks_get_disjoint_chunk_shares_and_resume_exactly():
    sizes = [5, 7, 3, 6, 6, 4, 8, 5]  # 44 samples in 8 chunks of unequal size
    owner = np.repeat(np.arange(len(sizes)), sizes)
    ranks = [ChunkShuffleSampler(sizes, 4, seed=3, rank=r, world_size=2, window=6) for r in (0, 1)]
    orders = []
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        a, b = (list(s) for s in ranks)
        assert len(a) == len(b) == len(ranks[0]) == 20  # 44 // (4 x 2) = 5 batches each
        assert not set(a) & set(b)  # disjoint
        assert len(set(owner[a]) & set(owner[b])) <= 1  # only a boundary chunk is shared
        orders.append(a)
    assert orders[0] != orders[1]  # another epoch, another order
    again = ChunkShuffleSampler(sizes, 4, seed=3, rank=1, world_size=2, window=6)
    again.set_epoch(1)
    again.resume_at(epoch=1, batches_done=2)
    assert list(again) == b[8:]


@pytest.mark.slow
def test_streaming_run_resumes_exactly(shards, tmp_path):
    """tests/test_resume.py's check on streaming shards: 8 steps == 4 steps + resume to 8, bit for bit."""
    from sslab.runs.training import train
    from tests.test_resume import losses

    common = [
        "trainer.max_steps=8",
        "trainer.max_epochs=-1",
        "checkpoint.every_n_steps=4",
        "checkpoint.save_top_k=-1",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    metrics = train(streaming_cfg(full, shards[1], *common))
    assert "eval/knn_top1" in metrics and "eval/linear_top1" in metrics  # labelled shards: evaluation on
    half = full / "checkpoints" / "step000004.ckpt"  # train() outside Hydra: the run dir is paths.output_dir
    train(streaming_cfg(resumed, shards[1], *common, f"resume={half}"))
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8  # 66 samples / 8 = 8 batches: steps cross an epoch end
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    la, lb = losses(full), losses(resumed)
    assert sorted(lb) == [4, 5, 6, 7] and all(la[s] == lb[s] for s in lb)


class IndexRecorder(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.indices = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.indices.append(batch["index"].clone())

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"indices": self.indices, "state": state}, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_process_ddp_reads_disjoint_shares_of_real_shards(shards, tmp_path, monkeypatch):
    from pytorch_lightning.strategies import DDPStrategy

    from sslab.build import build_datamodule, build_method

    for var in ("MASTER_ADDR", "MASTER_PORT"):  # Lightning sets them in this process; undone after the test
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    cfg = streaming_cfg(tmp_path, shards[1], "data.batch_size=4")
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="fork", static_graph=True),
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[IndexRecorder(tmp_path)],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_ddp.py: fork from a single-threaded parent
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    a, b = torch.cat(r0["indices"]).tolist(), torch.cat(r1["indices"]).tolist()
    assert len(a) == len(b) == 12 and not set(a) & set(b)
    for r, seen in ((0, a), (1, b)):  # each rank read exactly its own share of the chunk order
        expected = ChunkShuffleSampler(dm.train_set.chunk_sizes, 4, seed=0, rank=r, world_size=2, window=16)
        assert seen == expected.rank_order(0)[:12].tolist()
    # ranks in sync (BatchNorm running statistics aside: torch has no SyncBatchNorm on CPUs)
    synced = [k for k in r0["state"] if "running_" not in k and "num_batches_tracked" not in k]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in synced)
