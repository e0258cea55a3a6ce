"""Discovery metrics on hand-made ground truth (pycocotools AP / AR, CorLoc) and the pseudo-mask export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from sslab.build import build_datamodule, build_method
from sslab.cutler.pseudo_masks import coco_source
from sslab.errors import SSLabError
from sslab.evaluation.discovery import discovery_metrics
from sslab.runs.maskcut import export_pseudo_masks, main
from tests.conftest import make_cfg


def rle(mask: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def square(size: int, x: int, y: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y : y + side, x : x + side] = True
    return m


def write_gt(
    path: Path, objects: dict[int, list[tuple[int, int, int]]], size: int = 32, category: int = 3
) -> Path:
    """COCO JSON: image id -> squares (x, y, side), in the stamps on-disk format (RLE with str counts)."""
    images = [
        {"id": i, "file_name": f"images/test/{i:06d}.png", "width": size, "height": size, "caption": "x"}
        for i in objects
    ]
    anns = []
    for image_id, squares in objects.items():
        for x, y, side in squares:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": category + len(anns) % 2,  # several categories: evaluation ignores them
                    "bbox": [float(x), float(y), float(side), float(side)],
                    "area": float(side * side),
                    "iscrowd": 0,
                    "segmentation": rle(square(size, x, y, side)),
                }
            )
    cats = [{"id": category, "name": "animals"}, {"id": category + 1, "name": "food"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def prediction(image_id: int, x: int, y: int, side: int, score: float, size: int = 32) -> dict:
    return {
        "image_id": image_id,
        "category_id": 1,
        "bbox": [float(x), float(y), float(side), float(side)],
        "segmentation": rle(square(size, x, y, side)),
        "score": score,
    }


def test_perfect_predictions_score_one(tmp_path):
    objects = {1: [(2, 2, 10), (18, 16, 12)], 2: [(5, 6, 14)]}
    gt = write_gt(tmp_path / "gt.json", objects)
    preds = [prediction(i, *s, score=0.9 - 0.1 * k) for i, ss in objects.items() for k, s in enumerate(ss)]
    m = discovery_metrics(gt, preds)
    assert m == pytest.approx(
        {"box_ap50": 1.0, "mask_ap50": 1.0, "box_ar100": 1.0, "mask_ar100": 1.0, "corloc": 1.0}
    )


def test_shifted_box_below_half_iou_misses(tmp_path):
    gt = write_gt(tmp_path / "gt.json", {1: [(0, 0, 10)]})
    # shifted by 6 px: IoU = 40 / 160 = 0.25
    m = discovery_metrics(gt, [prediction(1, 6, 0, 10, score=1.0)])
    assert m["corloc"] == 0.0 and m["box_ap50"] == 0.0 and m["mask_ap50"] == 0.0


def test_ranking_enters_ap_and_corloc_uses_the_top_box(tmp_path):
    gt = write_gt(tmp_path / "gt.json", {1: [(0, 0, 10)], 2: [(10, 10, 10)]})
    hit, miss = prediction(1, 0, 0, 10, score=0.9), prediction(2, 0, 0, 10, score=0.8)
    # hit ranked first: precision 1 up to recall 0.5, then nothing -> 101-point AP = 51 / 101
    m = discovery_metrics(gt, [hit, miss])
    assert m["box_ap50"] == pytest.approx(51 / 101) and m["mask_ap50"] == pytest.approx(51 / 101)
    assert m["box_ar100"] == pytest.approx(0.5) and m["corloc"] == pytest.approx(0.5)
    # miss ranked first: precision 0.5 at recall 0.5 -> AP = 0.5 * 51 / 101; CorLoc is per image, unchanged
    m = discovery_metrics(gt, [{**hit, "score": 0.7}, miss])
    assert m["box_ap50"] == pytest.approx(0.5 * 51 / 101) and m["corloc"] == pytest.approx(0.5)
    # a second, lower-scored correct box on image 2 fixes recall but not image 2's CorLoc
    m = discovery_metrics(gt, [hit, miss, prediction(2, 10, 10, 10, score=0.1)])
    assert m["box_ar100"] == pytest.approx(1.0) and m["corloc"] == pytest.approx(0.5)
    assert discovery_metrics(gt, [])["box_ap50"] == 0.0


# -- export ---------------------------------------------------------------------------------------------
class HandMadeCoco:
    """The slice of the stamps data module that MaskCut export reads (``root``, ``coco_json(split)``)."""

    name = "hand_made"
    image_size = 32
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, root: Path) -> None:
        self.root = root

    def coco_json(self, split: str) -> Path:
        return self.root / f"{split}.json"


def hand_made_dataset(root: Path, n: int = 4, size: int = 32) -> HandMadeCoco:
    """Squares of a flat colour on smooth noise, with their exact masks."""
    rng = np.random.default_rng(0)
    (root / "images" / "test").mkdir(parents=True)
    objects = {}
    for i in range(n):
        bg = rng.uniform(40, 90, (size, size, 3))
        x, y, side = int(rng.integers(0, 14)), int(rng.integers(0, 14)), int(rng.integers(10, 17))
        bg[y : y + side, x : x + side] = [230, 40, 40]
        Image.fromarray(bg.astype(np.uint8)).save(root / "images" / "test" / f"{i + 1:06d}.png")
        objects[i + 1] = [(x, y, side)]
    write_gt(root / "test.json", objects, size)
    return HandMadeCoco(root)


@pytest.fixture(scope="module")
def dino_ckpt(tmp_path_factory) -> Path:
    """A checkpoint as train.py writes it (config, state dict, eval-encoder prefix) of an untrained tiny DINO."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = make_cfg(tmp, "data.image_size=32", "data.patch_size=8", "data.local_crop_size=16")
    torch.manual_seed(0)
    model = build_method(cfg, build_datamodule(cfg))
    path = tmp / "last.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "sslab_config": OmegaConf.to_container(cfg, resolve=True),
            "sslab_eval_backbone": model.eval_backbone_prefix(),
            "global_step": 0,
        },
        path,
    )
    return path


def test_export_writes_coco_json_that_pycocotools_reads(tmp_path, dino_ckpt):
    dm = hand_made_dataset(tmp_path / "data")
    out = export_pseudo_masks(
        dino_ckpt,
        split="test",
        out_json=tmp_path / "pm.json",
        n_masks=3,
        batch_size=3,
        device="cpu",
        datamodule=dm,
    )
    coco = COCO(str(out))
    gt_images = json.loads(dm.coco_json("test").read_text())["images"]
    assert coco.dataset["images"] == gt_images
    assert coco.dataset["categories"] == [{"id": 1, "name": "object"}]
    anns = coco.dataset["annotations"]
    assert {a["image_id"] for a in anns} == {i["id"] for i in gt_images}  # every image gets its first cut
    for a in anns:
        m = coco.annToMask(a).astype(bool)
        assert m.shape == (32, 32) and m.sum() == a["area"] > 0
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        ]  # tight box
        assert a["category_id"] == 1 and a["score"] in (1.0, pytest.approx(2 / 3), pytest.approx(1 / 3))
        blocks = m.reshape(4, 8, 4, 8).transpose(0, 2, 1, 3).reshape(16, 64)
        assert (blocks.all(1) | ~blocks.any(1)).all()  # nearest-upsampled 8 px patches, no CRF
    for image_id in coco.getImgIds():  # masks of one image are disjoint
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.sum(masks, axis=0).max() <= 1
    metrics = discovery_metrics(dm.coco_json("test"), out)  # the exported file is a valid prediction file
    assert set(metrics) == {"box_ap50", "mask_ap50", "box_ar100", "mask_ar100", "corloc"}


def test_export_needs_coco_masks_and_a_checkpoint(tmp_path, dino_ckpt, capsys):
    with pytest.raises(SSLabError, match="data=stamps"):
        coco_source(build_datamodule(make_cfg(tmp_path)), "test")
    with pytest.raises(SystemExit):
        main(["out=x.json"])
    assert "ckpt=PATH" in capsys.readouterr().err


def test_eval_discovery_reports_maskcut_and_random_init_rows(tmp_path, capsys):
    """``eval.py ckpt=... eval=discovery`` on a tiny real stamps build (tuxpaint cut-outs with exact masks)."""
    from hydra import compose, initialize_config_dir

    from sslab.dataset_builders import stamps as stamps_build
    from sslab.runs.evaluate import evaluate
    from tests.conftest import CONF

    if not stamps_build.STAMPS_DIR.is_dir():
        pytest.skip("tuxpaint-stamps-default not installed (make install-stamps)")
    stamps = [
        "data=stamps",
        f"data.root={tmp_path / 'stamps'}",
        "data.image_size=32",
        "data.local_crop_size=16",
        "data.num_train=4",
        "data.num_test=6",
        "data.gnome=false",
        "data.progress=false",
    ]
    tiny = ["++backbone.depth=2", "method.out_dim=256", "method.hidden_dim=64", "method.bottleneck_dim=32"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*stamps, *tiny, "logger=[csv]", f"paths.output_dir={tmp_path}"])
    dm = build_datamodule(cfg)
    dm.prepare_data()
    torch.manual_seed(0)
    model = build_method(cfg, dm)
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "sslab_config": OmegaConf.to_container(cfg, resolve=True),
            "sslab_eval_backbone": model.eval_backbone_prefix(),
        },
        ckpt,
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        eval_cfg = compose(
            "eval", overrides=[f"ckpt={ckpt}", "eval=discovery", "discovery.batch_size=4", "device=cpu"]
        )
    metrics = evaluate(eval_cfg)
    out = capsys.readouterr().out
    assert "object discovery" in out and "CorLoc" in out and "random-init" in out  # the table
    assert json.loads(out.strip().splitlines()[-1]) == metrics  # and the JSON line
    assert metrics["images"] == 6
    for tag in ("maskcut", "maskcut_random"):
        for k in ("box_ap50", "mask_ap50", "box_ar100", "mask_ar100", "corloc"):
            assert 0.0 <= metrics[f"eval/discovery_{tag}_{k}"] <= 100.0
    # the same numbers as scoring the exported pseudo-masks of the test split
    exported = export_pseudo_masks(
        ckpt, split="test", out_json=tmp_path / "pm.json", batch_size=4, device="cpu"
    )
    found = discovery_metrics(dm.coco_json("test"), exported)
    assert 100.0 * found["corloc"] == pytest.approx(metrics["eval/discovery_maskcut_corloc"])
    assert 100.0 * found["mask_ap50"] == pytest.approx(metrics["eval/discovery_maskcut_mask_ap50"])
