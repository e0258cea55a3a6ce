"""Atari data: preprocessing math, stacking and triplets within episodes, real-emulator RAM, determinism,
the shard cache, and the AtariARI-style probe's metrics."""

import numpy as np
import pytest
import torch

from sslab.data.atari import AtariTriplets, Collection, split_episodes, stack_indices, triplet_centres
from sslab.data.atari_games import RAM_ADDRESSES, ram_labels
from sslab.dataset_builders.atari_frames import (
    CollectSpec,
    Resizer,
    area_matrix,
    collect,
    load_or_collect,
    make_env,
)
from sslab.errors import SSLabError
from sslab.evaluation.atari_probe import fit_probe, predict_values, unseen_rows, value_entropy, weighted_f1

# -- preprocessing ---------------------------------------------------------------------------------------


def test_area_matrix_weights_are_fractional_overlaps():
    assert np.allclose(area_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # 5 -> 2: each output covers 2.5 inputs; the middle input is shared half and half
    assert np.allclose(area_matrix(5, 2), [[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]])
    assert np.allclose(area_matrix(210, 84).sum(1), 1.0)


def test_resizer_keeps_constants_and_averages_blocks():
    r = Resizer(84)
    assert (r(np.full((210, 160), 77, np.uint8)) == 77).all()
    img = np.zeros((4, 4), np.uint8)
    img[:2, :2] = 200
    out = Resizer(2, (4, 4))(img)
    assert out.tolist() == [[200, 0], [0, 0]]


# -- stacking and triplets -------------------------------------------------------------------------------


def test_stack_indices_repeat_the_first_frame_of_each_episode():
    episode = np.array([0, 0, 0, 1, 1])
    assert stack_indices(episode, 3).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3], [3, 3, 4]]


def test_triplet_centres_hand_case():
    episode = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    assert triplet_centres(episode, 1).tolist() == [1, 2, 3, 6]
    assert triplet_centres(episode, 2).tolist() == [2]
    with pytest.raises(SSLabError, match="gap"):
        triplet_centres(episode, 0)


@pytest.mark.parametrize("gap", [1, 3, 5])
def test_triplets_never_cross_an_episode_boundary(gap):
    rng = np.random.default_rng(gap)
    episode = np.repeat(np.arange(30), rng.integers(1, 12, size=30))
    frames = np.arange(len(episode), dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2)  # value = row
    col = Collection(frames, np.zeros((len(episode), 128), np.uint8), episode, stack_indices(episode, 3))
    centres = triplet_centres(episode, gap)
    expected = [
        t
        for t in range(len(episode))
        if gap <= t < len(episode) - gap and episode[t - gap] == episode[t] == episode[t + gap]
    ]
    assert centres.tolist() == expected and len(centres) > 0
    ds = AtariTriplets([(col, centres, 0)], gap)
    for i in range(len(ds)):
        item = ds[i]
        rows = item["frames"][:, :, 0, 0].long().numpy()  # (3 times, 3 stacked frames) of row numbers
        assert (episode[rows] == episode[centres[i]]).all()  # every frame of all three stacks: same episode
        assert (
            rows[1, -1] == centres[i] and rows[0, -1] == centres[i] - gap and rows[2, -1] == centres[i] + gap
        )
        assert torch.equal(item["image"], item["frames"][1])


def test_split_episodes_is_disjoint_complete_and_deterministic():
    episode = np.repeat(np.arange(10), 5)
    tr, te = split_episodes(episode, 0.8, seed=3)
    assert set(episode[tr]).isdisjoint(episode[te]) and len(tr) + len(te) == len(episode)
    assert len(set(episode[te])) == 2
    tr2, _ = split_episodes(episode, 0.8, seed=3)
    assert np.array_equal(tr, tr2)
    with pytest.raises(SSLabError, match="held-out"):
        split_episodes(np.zeros(5, int), 0.8, 0)


# -- the real emulator -----------------------------------------------------------------------------------


def _act(ale, action, steps):
    for _ in range(steps * 4):
        ale.act(action)


def test_pong_ram_reads_the_paddle_that_is_on_screen():
    """Fixed seed, no sticky actions: the player's paddle (RAM 51, AtariARI's player_y) starts at 109, moves up
    under RIGHT and down under LEFT, stops at 38 / 203, and its byte tracks the paddle drawn in column 140."""
    env = make_env(CollectSpec("Pong", 1, seed=0, sticky_prob=0.0))
    ale = env.unwrapped.ale
    up, down = ale.getMinimalActionSet()[2], ale.getMinimalActionSet()[3]  # RIGHT, LEFT
    screen = np.empty((210, 160), np.uint8)

    def state():
        names, values = ram_labels("Pong", ale.getRAM()[None])
        ale.getScreenGrayscale(screen)
        rows = np.flatnonzero((screen[34:194, 140:144] == 147).any(1)) + 34  # the paddle's grey level
        return dict(zip(names, values[0].tolist(), strict=True)), rows

    labels, _ = state()
    assert labels["player_y"] == 109 and labels["player_x"] == 188 and labels["enemy_x"] == 64
    seen = []
    for action, steps in [(up, 1), (up, 1), (down, 3), (down, 3), (up, 60), (down, 60)]:
        _act(ale, action, steps)
        labels, rows = state()
        seen.append(labels["player_y"])
        if rows.min() > 34 and rows.max() < 193:  # paddle fully inside the playfield
            assert abs(rows.max() - labels["player_y"]) <= 2
    assert seen[:2] == [99, 78] and seen[2] > seen[1] and seen[3] > seen[2]
    assert seen[4:] == [38, 203]
    env.close()


def test_collected_frames_and_ram_rows_are_aligned():
    """In collected 84x84 observations, the player's paddle row follows the RAM byte of the same row, and
    better than the byte of the previous or next row (no off-by-one between frames and RAM)."""
    data = collect(CollectSpec("Pong", 400, seed=1, max_episode_steps=400))
    names, values = ram_labels("Pong", data["ram"])
    y = values[:, names.index("player_y")].astype(float)
    bright = (
        data["frames"][:, 14:81, 74] > 120
    )  # the player's paddle column (x 140-143 of 160), playfield rows

    def corr(shift):
        ys = np.roll(y, shift)
        has = bright.any(1) & (ys > 45) & (ys < 190)
        centre = np.array([np.flatnonzero(b).mean() for b in bright[has]])
        return np.corrcoef(centre, ys[has])[0, 1], has.sum()

    (same, n), (before, _), (after, _) = corr(0), corr(1), corr(-1)
    assert n > 100 and same > 0.95 and same > before and same > after


def test_collection_is_deterministic_for_a_seed():
    spec = CollectSpec("Breakout", 150, seed=5, max_episode_steps=60)
    a, b = collect(spec), collect(spec)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["episode"].max() >= 2 and a["step"].max() == 59  # truncation makes episodes of 60 steps
    c = collect(CollectSpec("Breakout", 150, seed=6, max_episode_steps=60))
    assert not np.array_equal(a["ram"], c["ram"])


def test_cache_writes_shards_once_and_reads_them_back(tmp_path):
    spec = CollectSpec("Pong", 120, seed=2, max_episode_steps=50)
    [(_, first)] = list(load_or_collect([spec], tmp_path, shard_size=50, show_progress=False))
    shards = sorted((tmp_path / spec.key()).glob("shard_*.npz"))
    assert [p.name for p in shards] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    stamps = [p.stat().st_mtime_ns for p in shards]
    [(_, again)] = list(load_or_collect([spec], tmp_path, shard_size=50, show_progress=False))
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # reused, not rewritten
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_annotations_cover_the_four_games():
    assert {"Pong", "Breakout", "MsPacman", "SpaceInvaders"} <= set(RAM_ADDRESSES)
    assert RAM_ADDRESSES["Breakout"]["block_bit_map_29"] == 29 and RAM_ADDRESSES["MsPacman"]["player_x"] == 10
    with pytest.raises(SSLabError, match="choose from"):
        ram_labels("Tetris", np.zeros((1, 128), np.uint8))


# -- probe metrics ---------------------------------------------------------------------------------------


def test_weighted_f1_hand_case():
    # classes: 0 (support 2), 1 (support 1), 2 (support 1)
    target = torch.tensor([0, 0, 1, 2])
    pred = torch.tensor([0, 1, 1, 1])
    # class 0: tp 1, predicted 1, support 2 -> F1 = 2/3; class 1: tp 1, predicted 3, support 1 -> 0.5;
    # class 2: 0 -> weighted (2 * 2/3 + 1 * 0.5 + 0) / 4 = 11/24
    assert weighted_f1(pred, target) == pytest.approx(11 / 24)
    assert weighted_f1(target, target) == 1.0


def test_value_entropy_and_duplicates():
    vals = np.array([[0, 1], [0, 1], [0, 2], [0, 2]])
    assert value_entropy(vals) == pytest.approx([0.0, np.log(2)])
    train = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    test = np.stack([train[1], train[1] + 50])
    assert unseen_rows(train, test).tolist() == [False, True]


def test_linear_probe_reads_values_that_features_encode():
    rng = np.random.default_rng(0)
    labels = np.stack([rng.integers(0, 5, 200) * 10, rng.integers(100, 103, 200)], 1).astype(np.uint8)
    one_hot = torch.nn.functional.one_hot
    feats = torch.cat(
        [
            one_hot(torch.from_numpy(labels[:, 0] // 10).long()),
            one_hot(torch.from_numpy(labels[:, 1] - 100).long()),
        ],
        1,
    ).float()
    probe, values = fit_probe(feats, labels, epochs=60, lr=0.05, batch_size=64)
    assert [v.tolist() for v in values] == [[0, 10, 20, 30, 40], [100, 101, 102]]
    assert (predict_values(probe, values, feats) == labels).all()


def test_probe_features_pool_cls_mean_or_both(tmp_path):
    """atari_probe.pool: cls is the method's embed, mean averages the last layer's patch tokens, cls+mean
    concatenates them; an unknown pool is refused in one line."""
    from hydra import compose, initialize_config_dir

    from sslab.augment.multicrop import eval_view
    from sslab.build import build_datamodule, build_method
    from sslab.evaluation.atari_probe import pooled_embed
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=["method=vicreg", "data.source=embedded", f"paths.output_dir={tmp_path}"]
        )
    torch.manual_seed(0)
    model = build_method(cfg, build_datamodule(cfg))
    images = torch.randint(0, 256, (5, len(model.data.mean), 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        x = eval_view(images, model.data.image_size, model.data.mean, model.data.std)
        model.eval()
        tokens = model.eval_backbone().forward_tokens(x)
    cls, mean = tokens["cls"], tokens["patch"].mean(1)
    assert not torch.allclose(cls, mean)
    assert torch.allclose(pooled_embed(model, "cls")(images), cls, atol=1e-6)
    assert torch.allclose(pooled_embed(model, "mean")(images), mean, atol=1e-6)
    assert torch.allclose(pooled_embed(model, "cls+mean")(images), torch.cat([cls, mean], 1), atol=1e-6)
    with pytest.raises(SSLabError, match=r"atari_probe\.pool='max': choose one of cls, mean, cls\+mean"):
        pooled_embed(model, "max")
