"""TOV-VICReg: the temporal order task's labelling math, the observation views, and real training / probing
runs through the entry points on a tiny real Atari collection."""

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sslab.augment.temporal_views import ObservationViews, TemporalViews
from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.modules.temporal_order import (
    ORDERS,
    TemporalOrderHead,
    order_targets,
    permute_features,
    sample_orders,
    temporal_order_loss,
)
from sslab.runs.training import train
from tests.conftest import CONF

# -- the order task --------------------------------------------------------------------------------------


def test_the_six_orders_are_all_permutations_and_only_the_identity_is_true():
    rows = {tuple(r) for r in ORDERS.tolist()}
    assert len(rows) == 6 and all(sorted(r) == [0, 1, 2] for r in rows)
    assert ORDERS[0].tolist() == [0, 1, 2]
    assert order_targets(torch.arange(6)).flatten().tolist() == [1, 0, 0, 0, 0, 0]


def test_permute_features_places_each_frame_in_its_slot():
    # reference order (o_t, o_{t-1}, o_{t+1}) marked by feature values 10, 20, 30; D = 2
    feats = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]]).repeat(6, 1, 1)
    out = permute_features(feats, torch.arange(6))
    assert out.shape == (6, 6)
    firsts = out[:, ::2].tolist()  # one value per slot
    assert firsts == [
        [10, 20, 30],  # true order
        [10, 30, 20],
        [20, 10, 30],
        [20, 30, 10],  # order 3 = [1, 2, 0]: o_{t-1}, o_{t+1}, o_t
        [30, 10, 20],
        [30, 20, 10],
    ]


def test_order_sampling_balance():
    torch.manual_seed(0)
    uniform = sample_orders(60000)
    assert (uniform == 0).float().mean().item() == pytest.approx(1 / 6, abs=0.01)
    assert torch.bincount(uniform, minlength=6).min() > 9500
    balanced = sample_orders(60000, balanced=True)
    assert (balanced == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    wrong = torch.bincount(balanced[balanced > 0], minlength=6)[1:].float()
    assert (wrong / wrong.sum() - 0.2).abs().max() < 0.01  # negatives spread evenly over the 5 wrong orders


def test_order_loss_of_an_undecided_head_is_log2():
    head = TemporalOrderHead(4)
    torch.nn.init.zeros_(head.linear.weight)
    torch.nn.init.zeros_(head.linear.bias)
    loss, acc = temporal_order_loss(head, torch.randn(8, 3, 4), torch.tensor([0, 1, 2, 3, 4, 5, 0, 0]))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert acc.item() == pytest.approx(5 / 8)  # logit 0 -> "not true", right for the 5 shuffled samples


# -- views -----------------------------------------------------------------------------------------------


def test_temporal_views_shapes_and_untouched_neighbours():
    b, size = 4, 48
    frames = torch.zeros(b, 3, 3, 84, 84, dtype=torch.uint8)
    frames[:, 0], frames[:, 1], frames[:, 2] = 51, 102, 204  # o_{t-1}, o_t, o_{t+1}
    views = TemporalViews(size, [0.5] * 3, [0.5] * 3, jitter_p=0.0)(frames)
    v1, v2 = views["views"]
    prev, nxt = views["adjacent"]
    assert v1.shape == v2.shape == prev.shape == (b, 3, size, size)
    # neighbours: centre crop only (no jitter here), normalised with mean 0.5 / std 0.5
    assert torch.allclose(prev, torch.full_like(prev, (51 / 255 - 0.5) / 0.5), atol=1e-6)
    assert torch.allclose(nxt, torch.full_like(nxt, (204 / 255 - 0.5) / 0.5), atol=1e-6)


def test_observation_views_keep_the_frame_stack_apart():
    """With the default (no hue / saturation / greyscale) the three time channels are never mixed: a stack whose
    frames differ stays ordered channel by channel after every view."""
    torch.manual_seed(0)
    img = torch.zeros(8, 3, 84, 84, dtype=torch.uint8)
    img[:, 0], img[:, 1], img[:, 2] = 40, 120, 220
    for v in ObservationViews(48, [0.0] * 3, [1.0] * 3, solarize_p=(0.0, 0.0))(img):
        means = v.mean((2, 3))
        assert (means[:, 0] < means[:, 1]).all() and (means[:, 1] < means[:, 2]).all()


def test_shift_views_are_windows_of_the_replicate_padded_stack():
    """crop=shift (DrQ): each view is exactly an 80 px window of the 84 px stack padded by 4 replicated pixels,
    so its offset from the centre is at most 2 + 4 = 6 px and the scale is unchanged."""
    torch.manual_seed(0)
    img = torch.randint(0, 256, (6, 3, 84, 84), dtype=torch.uint8)
    views = ObservationViews(
        80,
        [0.0] * 3,
        [1.0] * 3,
        crop="shift",
        shift_pad=4,
        jitter_p=0.0,
        flip_p=0.0,
        blur_p=(0.0, 0.0),
        solarize_p=(0.0, 0.0),
    )(img)
    padded = torch.nn.functional.pad(img.float() / 255, (4, 4, 4, 4), mode="replicate")
    offsets = set()
    for v in views:
        for b in range(len(img)):
            hits = [
                (i, j)
                for i in range(13)
                for j in range(13)
                if torch.allclose(padded[b, :, i : i + 80, j : j + 80], v[b], atol=1e-6)
            ]
            assert len(hits) == 1, hits
            offsets.add(hits[0])
    assert len(offsets) > 1  # the shifts are drawn per image


def test_views_without_crop_are_the_evaluation_centre_crop():
    from sslab.augment.multicrop import eval_view

    img = torch.randint(0, 256, (4, 3, 84, 84), dtype=torch.uint8)
    views = ObservationViews(
        80, [0.5] * 3, [0.5] * 3, crop="none", jitter_p=0.0, flip_p=0.0, blur_p=(0.0,), solarize_p=(0.0,)
    )(img)
    for v in views:
        assert torch.allclose(v, eval_view(img, 80, [0.5] * 3, [0.5] * 3), atol=1e-6)


def test_unknown_crop_is_refused():
    with pytest.raises(SSLabError, match=r"method\.views\.crop='centre': choose resized, shift or none"):
        ObservationViews(80, [0.5] * 3, [0.5] * 3, crop="centre")


# -- real runs -------------------------------------------------------------------------------------------


def atari_cfg(tmp_path: Path, method: str, *overrides: str):
    tiny = [
        f"method={method}",
        "data=atari",
        "backbone=vit_t",
        "++backbone.depth=2",
        "++backbone.embed_dim=64",
        "++backbone.num_heads=2",
        "data.games=[Pong,Breakout]",
        "data.frames_per_game=300",
        "data.probe_frames_per_game=300",
        "data.max_episode_steps=100",
        f"data.cache_dir={tmp_path.parent / 'atari_cache'}",
        "data.image_size=48",
        "data.batch_size=16",
        "data.eval_bank_size=100",
        "data.eval_test_size=100",
        "data.progress=false",
        "method.projector_dims=[128,128]",
        "method.base_lr=0.02",
        "method.warmup_epochs=0",
        "logger=[csv]",
        "callbacks=[]",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "final_eval.baselines=false",
        f"paths.output_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*tiny, *overrides])


def logged(run_dir: str, key: str) -> list[float]:
    path = next(Path(run_dir).glob("csv/**/metrics.csv"))
    return [float(r[key]) for r in csv.DictReader(path.open()) if r.get(key)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tov_vicreg", "vicreg"])
def test_training_on_atari_lowers_the_loss(tmp_path, method):
    metrics = train(atari_cfg(tmp_path, method, "trainer.max_steps=40"))
    losses = logged(metrics["run_dir"], "train/loss")
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    if method == "tov_vicreg":
        assert len(logged(metrics["run_dir"], "train/temporal")) == 40


@pytest.mark.slow
def test_atari_probe_compares_checkpoints_and_random_init(tmp_path, capsys):
    from sslab.runs.evaluate import evaluate

    ckpts = []
    for method in ("tov_vicreg", "vicreg"):
        m = train(atari_cfg(tmp_path / method, method, "trainer.max_steps=2"))
        ckpts.append(Path(m["run_dir"]) / "checkpoints" / "last.ckpt")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                "eval=atari_probe",
                f"ckpt={ckpts[0]}",
                f"compare=[{ckpts[1]}]",
                "atari_probe.epochs=3",
            ],
        )
    out = evaluate(cfg)
    table = out["atari_probe"]
    assert list(table) == ["tov_vicreg @ step 2", "vicreg @ step 2", "random init (vit_t)"]
    for row in table.values():
        assert set(row) == {"Pong", "Breakout", "mean"} and all(0.0 <= v <= 1.0 for v in row.values())
        assert row["mean"] == pytest.approx((row["Pong"] + row["Breakout"]) / 2)
    assert "player_y" in out["atari_probe_per_variable"]["vicreg @ step 2"]["Pong"]
    assert "AtariARI probe" in capsys.readouterr().out


def test_tov_vicreg_needs_frames(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=["method=tov_vicreg", "data.source=embedded", f"paths.output_dir={tmp_path}"]
        )
    with pytest.raises(SSLabError, match=r"needs batch key\(s\) \['frames'\]"):
        build_method(cfg, build_datamodule(cfg))
