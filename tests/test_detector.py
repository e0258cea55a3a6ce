"""CutLER's detector: mask batches, copy-paste, self-training merges, training, exact resume, COCO output."""

import csv
import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sslab.cutler.detector_data import (
    CocoInstances,
    boxes_from_masks,
    collate_padded,
    copy_paste,
    targets_from_masks,
)
from sslab.cutler.self_training import self_training_json
from sslab.cutler.train_detector import predict, train_detector
from sslab.errors import SSLabError
from sslab.evaluation.discovery import discovery_metrics

SIZE = 64
BACKBONE = {"name": "vit_t", "img_size": SIZE, "patch_size": 8, "depth": 2}


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode()}


def square(x: int, y: int, w: int, h: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[y : y + h, x : x + w] = 1
    return m


def make_squares(root, n: int = 16, seed: int = 0):
    """Bright rectangles (1-3 per image) on dark noise, with their exact masks as COCO json."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(SIZE // 5, SIZE // 2, 2)
            x, y = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
            m = square(x, y, w, h)
            img[m.astype(bool)] = rng.integers(120, 256, 3)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                    "segmentation": rle(m),
                    "score": 1.0,
                }
            )
        name = f"images/{i:06d}.png"
        Image.fromarray(img).save(root / name)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
    path = root / "train.json"
    path.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]})
    )
    return path


# -- data ----------------------------------------------------------------------------------------------
def test_boxes_from_masks_are_pixel_edges_like_pycocotools():
    m = square(3, 5, 4, 2)
    box = boxes_from_masks(torch.from_numpy(m).bool()[None])[0]
    assert box.tolist() == [3.0, 5.0, 7.0, 7.0]
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m)))
    assert [x, y, x + w, y + h] == box.tolist()
    assert boxes_from_masks(torch.zeros(1, 8, 8, dtype=torch.bool)).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_dataset_pads_instances_and_skips_unannotated_images(tmp_path):
    path = make_squares(tmp_path, n=3)
    coco = json.loads(path.read_text())
    coco["images"].append({"id": 99, "file_name": "images/000000.png", "width": SIZE, "height": SIZE})
    empty = {**coco["annotations"][0], "id": 1000, "segmentation": rle(np.zeros((SIZE, SIZE)))}
    path.write_text(json.dumps({**coco, "annotations": [*coco["annotations"], empty]}))
    data = CocoInstances(tmp_path, path)
    assert len(data) == 3  # image 99 has no annotation
    batch = collate_padded([data[i] for i in range(3)])
    counts = [sum(a["image_id"] == im["id"] for a in coco["annotations"]) for im in coco["images"][:3]]
    assert batch["valid"].sum(1).tolist() == counts
    assert batch["masks"].shape == (3, max(counts), SIZE, SIZE)
    targets = targets_from_masks(batch["masks"], batch["valid"])
    first = [a["bbox"] for a in coco["annotations"] if a["image_id"] == 1]
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in first]
    assert targets[0]["boxes"].tolist() == xyxy
    assert len(CocoInstances(tmp_path, path, skip_empty=False)) == 4


def test_copy_paste_at_full_scale_composites_and_occludes_by_hand():
    """Ratio 1 puts the source image at offset 0: image 1 receives image 0's single square."""
    a, b = square(0, 0, 8, 8), square(4, 0, 8, 8)  # A covers 4 x 8 = 32 of B's 64 px = 50%
    c = square(6, 0, 8, 8)  # A covers 2 x 8 = 16 of C's 64 px = 25%
    images = torch.stack(
        [torch.full((3, SIZE, SIZE), 200, dtype=torch.uint8), torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)]
    )
    for target, expect_pasted in ((b, False), (c, True)):
        masks = torch.from_numpy(np.stack([[a], [target]])).bool()
        valid = torch.ones(2, 1, dtype=torch.bool)
        out, out_masks, out_valid = copy_paste(images, masks, valid, 1.0, 1.0)
        assert out_masks.shape == (2, 2, SIZE, SIZE)
        if not expect_pasted:  # A would cover >= 50% of B: nothing changes in image 1
            assert out_valid[1].tolist() == [True, False]
            assert torch.equal(out[1], images[1])
            continue
        assert out_valid[1].tolist() == [True, True]
        assert torch.equal(out_masks[1, 1], torch.from_numpy(a).bool())  # pasted A, exactly
        assert torch.equal(out_masks[1, 0], torch.from_numpy(c * (1 - a)).bool())  # C occluded by A
        assert torch.equal(out[1, :, :8, :8], images[0, :, :8, :8])
        assert torch.equal(out[1, :, 8:, :], images[1, :, 8:, :])
        box = boxes_from_masks(out_masks[1])
        assert box.tolist() == [[8.0, 0.0, 14.0, 8.0], [0.0, 0.0, 8.0, 8.0]]


def test_copy_paste_scales_pasted_instances():
    torch.manual_seed(0)
    masks = torch.zeros(4, 1, SIZE, SIZE, dtype=torch.bool)
    masks[:, 0, 16:48, 16:48] = True  # a 32 px square in every image
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    _, out, valid = copy_paste(images, masks, torch.ones(4, 1, dtype=torch.bool), 0.5, 0.5)
    pasted = out[:, 1][valid[:, 1]]
    assert len(pasted) > 0
    assert all(abs(int(m.sum()) - 16 * 16) <= 2 * 16 + 1 for m in pasted)  # (0.5 * 32)^2 up to a border line


# -- self-training ---------------------------------------------------------------------------------------
def test_self_training_json_keeps_confident_predictions_and_unmatched_old_masks(tmp_path):
    def img(i):
        return {"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE}

    def old(i, m):
        return {"image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": rle(m)}

    A, B = square(0, 0, 10, 10), square(30, 30, 10, 10)
    prev = {
        "images": [img(1), img(2), img(3)],
        "annotations": [old(1, A), old(1, B), old(3, A)],
        "categories": [{"id": 1, "name": "object"}],
    }
    (tmp_path / "r0.json").write_text(json.dumps(prev))

    def pred(i, m, s):
        return {
            "image_id": i,
            "category_id": 1,
            "bbox": [1, 2, 3, 4],
            "score": s,
            "segmentation": rle(m),
        }

    p1 = square(0, 0, 10, 8)  # IoU 0.8 with A: replaces A
    p2 = square(36, 30, 10, 10)  # IoU 40 / 160 = 0.25 with B: B stays
    p3 = square(50, 0, 10, 10)  # score 0.5 < 0.7: ignored
    p4 = square(5, 5, 20, 20)  # image 2 had no old mask
    empty = np.zeros((SIZE, SIZE))  # a confident box whose mask is empty: left out
    preds = [pred(1, p1, 0.9), pred(1, p2, 0.7), pred(1, p3, 0.5), pred(2, p4, 0.8), pred(2, empty, 0.95)]
    out = self_training_json(tmp_path / "r0.json", preds, 0.7, tmp_path / "r1.json")
    got = json.loads(out.read_text())
    assert got["images"] == prev["images"]
    anns = got["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4, 5]

    def as_mask(a):
        return mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})

    expected = [(1, p1), (1, p2), (1, B), (2, p4), (3, A)]
    for a, (image_id, m) in zip(anns, expected, strict=True):
        assert a["image_id"] == image_id
        assert np.array_equal(as_mask(a), m)
        assert a["area"] == m.sum()
    assert [a["score"] for a in anns] == [0.9, 0.7, 1.0, 0.8, 1.0]
    assert COCO(str(out)).getAnnIds() == [1, 2, 3, 4, 5]


# -- training ------------------------------------------------------------------------------------------
RUN = dict(max_steps=6, batch_size=4, lr=3e-4, copy_paste=True, seed=0, checkpoint_every=3, log_every=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    path = make_squares(root)
    last = train_detector(root, path, root / "full", None, BACKBONE, **RUN)
    return root, path, last


def logged(run_dir, key="train/loss"):
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


@pytest.mark.slow
def test_detector_trains_with_falling_loss(trained):
    root, _, last = trained
    loss = logged(root / "full")
    assert sorted(loss) == list(range(6))
    assert (loss[4] + loss[5]) / 2 < 0.8 * loss[0], loss
    kept = logged(root / "full", "train/droploss_kept")
    assert all(0 < v <= 1 for v in kept.values())
    assert torch.load(last, weights_only=False)["global_step"] == 6


class Killed(RuntimeError):
    pass


class KillBeforeStep(pl.Callback):
    """Crash the run as a kill would: between steps, after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed before step {self.step + 1}")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(trained):
    """Killed after step 3 (mid-epoch: 4 batches per epoch), resumed from last.ckpt to step 6: the weights
    and the optimiser state equal those of the run that was never stopped."""
    root, path, last = trained
    run = root / "killed"
    with pytest.raises(Killed):
        train_detector(root, path, run, None, BACKBONE, **RUN, callbacks=[KillBeforeStep(3)])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    resumed = train_detector(root, path, run, None, BACKBONE, **RUN)
    a, b = torch.load(last, weights_only=False), torch.load(resumed, weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


@pytest.mark.slow
def test_predictions_are_coco_results(trained, tmp_path):
    root, path, last = trained
    preds = predict(last, root, path, score_threshold=0.0, device="cpu")
    assert preds and {p["image_id"] for p in preds} <= set(range(1, 17))
    assert all(p["category_id"] == 1 and len(p["bbox"]) == 4 for p in preds)
    gt = COCO(str(path))
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(preds), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert 0.0 <= ev.stats[1] <= 1.0  # AP50 computed
    metrics = discovery_metrics(path, preds)  # helper C's class-agnostic evaluation reads them too
    assert set(metrics) == {"box_ap50", "mask_ap50", "box_ar100", "mask_ar100", "corloc"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # confident predictions feed the next round
    out = self_training_json(path, preds, 0.5, tmp_path / "r1.json")
    assert COCO(str(out)).getImgIds() == gt.getImgIds()


@pytest.mark.slow
def test_backbone_starts_from_a_dino_checkpoint(tmp_path):
    """A real one-step DINO run (28 px Fashion-MNIST, patch 7) initialises the detector's ViT, which runs at
    patch 8 on 64 px images; with lr 0 one detector step leaves the encoder exactly at DINO's teacher."""
    from sslab.init_from import load_eval_backbone_state
    from sslab.runs.training import train
    from tests.conftest import make_cfg

    train(make_cfg(tmp_path / "dino", "trainer.max_steps=1", "callbacks=[]"))
    dino = tmp_path / "dino" / "checkpoints" / "last.ckpt"
    cfg, teacher = load_eval_backbone_state(dino)
    assert cfg["patch_size"] == 7
    path = make_squares(tmp_path, n=4)
    last = train_detector(
        tmp_path, path, tmp_path / "det", str(dino), None, **{**RUN, "max_steps": 1, "lr": 0.0}, patch_size=8
    )
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["hyper_parameters"]["mean"] == (0.2860, 0.2860, 0.2860)  # DINO's data statistics
    prefix = "model.backbone.vit."
    got = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    assert got.keys() == teacher.keys()
    assert all(torch.equal(got[k], teacher[k]) for k in teacher)
    with pytest.raises(SSLabError, match="power of two"):
        train_detector(tmp_path, path, tmp_path / "det7", str(dino), None, **{**RUN, "max_steps": 1})
