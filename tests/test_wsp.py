"""WSP (CLIP-style image-text pretraining) and zero-shot classification: the symmetric InfoNCE and the
logit scale against hand-worked values, end-token pooling of the text tower, prompt ensembling on a
hand-built case, the all-gathered loss over 2 gloo ranks, Fashion-MNIST captions, and a short real run
whose zero-shot accuracy beats chance."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sslab.build import build_datamodule, build_method
from sslab.data.text import EOS_ID, PAD_ID, PROMPT_TEMPLATES, decode, templated_caption, tokenize
from sslab.errors import SSLabError
from sslab.evaluation.zero_shot import has_text_tower, zero_shot_predict
from sslab.modules.clip_loss import LogitScale, prompt_ensemble, symmetric_info_nce
from sslab.modules.text_tower import TextTower, eos_positions
from tests.conftest import CONF, TINY
from tests.gloo import run_two_ranks

# TINY minus its DINO head sizes, which WSP does not have
WSP_TINY = [o for o in TINY if not o.startswith("method.")]


def wsp_cfg(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config", overrides=[*WSP_TINY, "method=wsp", f"paths.output_dir={tmp_path}", *overrides]
        )


def tiny_wsp(tmp_path, *overrides: str):
    cfg = wsp_cfg(tmp_path, "method.text_width=32", "method.embed_dim=16", *overrides)
    dm = build_datamodule(cfg)
    return build_method(cfg, dm), dm, cfg


# -- loss and logit scale --------------------------------------------------------------------------------
def test_symmetric_info_nce_matches_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # cosines I T^T = [[0.6, 0], [0.8, 1]], times 2: image->text rows [1.2, 0], [1.6, 2];
    # text->image rows (the columns) [1.2, 1.6], [0, 2]; the positive is the diagonal
    i2t = (-1.2 + math.log(math.exp(1.2) + 1.0) + -2.0 + math.log(math.exp(1.6) + math.exp(2.0))) / 2
    t2i = (-1.2 + math.log(math.exp(1.2) + math.exp(1.6)) + -2.0 + math.log(1.0 + math.exp(2.0))) / 2
    expected = (i2t + t2i) / 2
    assert symmetric_info_nce(image, text, scale).item() == pytest.approx(expected, rel=1e-6)
    # the temperature multiplies the logits: at scale 1 every logit halves
    i2t1 = (-0.6 + math.log(math.exp(0.6) + 1.0) + -1.0 + math.log(math.exp(0.8) + math.exp(1.0))) / 2
    t2i1 = (-0.6 + math.log(math.exp(0.6) + math.exp(0.8)) + -1.0 + math.log(1.0 + math.exp(1.0))) / 2
    assert symmetric_info_nce(image, text, torch.tensor(1.0)).item() == pytest.approx(
        (i2t1 + t2i1) / 2, rel=1e-6
    )


def test_info_nce_rows_against_global_columns_use_the_offset():
    # rank 1 of 2 holds rows 2..3 of the global batch: its positives are columns 2 and 3
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    s = torch.tensor(5.0)
    part = symmetric_info_nce(img[2:], txt[2:], s, img, txt, offset=2)
    logits = s * img @ txt.T
    by_hand = (
        -logits[2, 2]
        + torch.logsumexp(logits[2], 0)
        - logits[3, 3]
        + torch.logsumexp(logits[3], 0)
        - logits[2, 2]
        + torch.logsumexp(logits[:, 2], 0)
        - logits[3, 3]
        + torch.logsumexp(logits[:, 3], 0)
    ) / 4
    assert part.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_logit_scale_starts_at_log_1_over_0_07_and_is_clipped_at_100():
    ls = LogitScale()
    assert ls.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert ls().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        ls.logit_scale.fill_(10.0)
    assert ls().item() == pytest.approx(100.0, rel=1e-6)  # never scales the logits by more than 100
    ls.clamp_()
    assert ls.logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    with torch.no_grad():
        ls.logit_scale.fill_(1.0)
    ls.clamp_()
    assert ls.logit_scale.item() == 1.0  # below the cap nothing changes
    assert ls().item() == pytest.approx(math.e, rel=1e-6)


# -- text tower ------------------------------------------------------------------------------------------
def test_eos_positions_by_hand():
    tokens = torch.tensor([[1, 70, 71, EOS_ID, PAD_ID, PAD_ID], [1, 70, 71, 72, 73, EOS_ID]])
    assert eos_positions(tokens).tolist() == [3, 5]


def test_text_tower_reads_the_end_token_and_ignores_what_follows():
    torch.manual_seed(0)
    tower = TextTower(embed_dim=8, context_length=12, width=16, depth=2, heads=2).eval()
    tokens = tokenize(["ab", "abcdefg"], 12)
    with torch.no_grad():
        out = tower.features(tokens)
        # the feature of row 0 is the last position of the row cut right after its end token (index 3)
        cut = tower.features(tokens[:1, :4])
        assert torch.allclose(out[0], cut[0], atol=1e-6)
        # anything after the end token (padding, or even bytes) changes nothing: the mask is causal
        noisy = tokens.clone()
        noisy[0, 4:] = torch.randint(3, 259, (8,))
        assert torch.allclose(tower.features(noisy), out, atol=1e-6)
        # a token before the end token does change it (the control)
        edited = tokens.clone()
        edited[0, 2] = 100
        assert not torch.allclose(tower.features(edited)[0], out[0], atol=1e-4)
        assert torch.allclose(tower.features(edited)[1], out[1], atol=1e-6)  # rows are independent
        assert tower(tokens).shape == (2, 8)


def test_text_longer_than_the_context_is_refused():
    tower = TextTower(embed_dim=8, context_length=6, width=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="longer than the tower's context 6"):
        tower(tokenize(["abcdefgh"], 10))


# -- zero-shot -------------------------------------------------------------------------------------------
def test_prompt_ensemble_normalises_each_template_then_the_mean():
    feats = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # class 0: two templates, one with a larger norm
            [[0.0, 0.0, 3.0], [0.0, 0.0, 1.0]],  # class 1
        ]
    )
    s = 1 / math.sqrt(2)
    assert torch.allclose(prompt_ensemble(feats), torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]), atol=1e-6)


def test_zero_shot_picks_the_nearest_class_embedding():
    feats = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    classes = prompt_ensemble(feats)
    # cosines of image 0 (scaled: the image is normalised too): class 0 (0.1 + 0.9) / sqrt 2 = 0.707, class 1 0.6
    images = torch.tensor([[0.1, 0.9, 0.6], [0.5, 0.0, 0.9], [3.0, 0.1, 0.2]])
    assert zero_shot_predict(images, classes).tolist() == [0, 1, 0]
    # with the first template alone, image 0 would go to class 1 (0.1 < 0.6): the ensemble decides
    assert zero_shot_predict(images[:1], feats[:, 0]).tolist() == [1]


# -- the method ------------------------------------------------------------------------------------------
def test_wsp_param_groups_and_embed(tmp_path):
    model, _, _ = tiny_wsp(tmp_path)
    groups = model.param_groups()
    no_decay = {id(p) for g in groups if not g["apply_wd"] for p in g["params"]}
    decay = {id(p) for g in groups if g["apply_wd"] for p in g["params"]}
    assert [g["weight_decay"] for g in groups if g["apply_wd"]] == [0.2]  # CLIP's weight decay
    assert model.betas == (0.9, 0.98)
    tt = model.text_tower
    # OpenCLIP training/main.py: no decay for ndim < 2, bn/ln/bias names and the logit scale;
    # the token and position embeddings are decayed
    for p in (model.logit_scale.logit_scale, tt.ln_final.weight, tt.blocks[0].linear1.bias):
        assert id(p) in no_decay
    for p in (tt.proj.weight, model.image_proj.weight, tt.blocks[0].linear1.weight, tt.token_embed):
        assert id(p) in decay
    assert id(tt.pos_embed) in decay
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(no_decay) + len(decay) == n_params  # every trainable parameter is optimised once
    x = torch.randn(3, 3, 28, 28)
    assert torch.equal(model.embed(x), model.backbone(x))  # pre-projection features for k-NN / probes
    assert model.encode_image(x).norm(dim=1).allclose(torch.ones(3))
    assert has_text_tower(model)


def test_fashion_mnist_batches_carry_templated_captions(tmp_path):
    cfg = wsp_cfg(tmp_path)
    dm = build_datamodule(cfg)
    dm.setup()
    assert "text" in dm.provides and dm.context_length == 32
    for i in (0, 1, 2, 3, 7):
        item = dm.train_set[i]
        assert item["text"].dtype == torch.int64 and item["text"].shape == (32,)
        name = dm.class_names[int(item["label"])]
        assert torch.equal(item["text"], tokenize([templated_caption(name, i)], 32)[0])
    assert decode(dm.train_set[0]["text"]).startswith(PROMPT_TEMPLATES[0].format("")[:10])
    batch = next(iter(dm.train_dataloader()))
    assert batch["text"].shape == (16, 32) and batch["text"].dtype == torch.int64


def test_wsp_on_data_without_captions_is_one_line(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 80, 120)).save(tmp_path / "imgs" / cls / f"{i}.png")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "method=wsp",
                "data=imagefolder",
                f"data.path={tmp_path / 'imgs'}",
                "++backbone.depth=2",
            ],
        )
    with pytest.raises(SSLabError, match=r"method=wsp needs batch key\(s\) \['text'\]"):
        build_method(cfg, build_datamodule(cfg))


def test_init_from_loads_an_mae_encoder_into_the_image_tower(tmp_path):
    mae_cfg = wsp_cfg(tmp_path, "method=mae")
    mae = build_method(mae_cfg, build_datamodule(mae_cfg))
    path = tmp_path / "mae.ckpt"
    torch.save(
        {
            "state_dict": mae.state_dict(),
            "sslab_config": {"backbone": dict(mae_cfg.backbone)},
            "sslab_eval_backbone": mae.eval_backbone_prefix(),
        },
        path,
    )
    model, _, _ = tiny_wsp(tmp_path)
    text_before = {k: v.clone() for k, v in model.text_tower.state_dict().items()}
    model.init_backbone_from(str(path))
    for k, v in mae.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v)
    assert all(torch.equal(v, model.text_tower.state_dict()[k]) for k, v in text_before.items())


def test_zero_shot_callback_is_a_no_op_without_a_text_tower(tmp_path):
    from sslab.callbacks.zero_shot import ZeroShotEval

    cfg = wsp_cfg(tmp_path, "method=vicreg")
    vicreg = build_method(cfg, build_datamodule(cfg))
    assert not has_text_tower(vicreg)
    cb = ZeroShotEval()
    cb.evaluate(trainer=None, pl_module=vicreg)  # returns before touching the trainer
    assert cb.noted and not hasattr(vicreg, "eval_results")


# -- DDP -------------------------------------------------------------------------------------------------
CLIP_RANK_SCRIPT = """
from sslab.modules.clip_loss import clip_loss
img, txt, t = torch.load(path)
img, txt = (x.split(3)[rank].clone().requires_grad_() for x in (img, txt))
t = t.clone().requires_grad_()
loss = clip_loss(img, txt, t.exp())
loss.backward()
torch.save({"loss": loss.detach(), "gi": img.grad, "gt": txt.grad, "gs": t.grad}, f"{path}.{rank}")
"""


@pytest.mark.slow
def test_clip_loss_over_two_ranks_equals_one_process_on_the_global_batch(tmp_path):
    # negatives come from both ranks (all_gather with gradients): the mean of the rank losses is the
    # one-process loss on the global batch, and each rank's gradient / world size (DDP's average) is that
    # loss's gradient for its rows; the logit scale's gradient averages the same way
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    t = torch.tensor(math.log(1 / 0.07))
    path = tmp_path / "feats.pt"
    torch.save((img, txt, t), path)
    ranks = run_two_ranks(CLIP_RANK_SCRIPT, path)

    fi, ft, ts = img.clone().requires_grad_(), txt.clone().requires_grad_(), t.clone().requires_grad_()
    loss = symmetric_info_nce(fi, ft, ts.exp())
    loss.backward()
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=1e-6)
    assert torch.allclose(torch.cat([r["gi"] for r in ranks]) / 2, fi.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["gt"] for r in ranks]) / 2, ft.grad, atol=1e-6)
    assert torch.allclose((ranks[0]["gs"] + ranks[1]["gs"]) / 2, ts.grad, atol=1e-6)
    # negative control: without the gather each rank would contrast its 3 rows among themselves
    local = symmetric_info_nce(img[:3], txt[:3], t.exp())
    assert not torch.allclose(local, ranks[0]["loss"], rtol=1e-3)


# -- a short real run ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wsp_zero_shot_beats_chance_after_a_short_run(tmp_path):
    from sslab.runs.evaluate import evaluate
    from sslab.runs.training import train

    cfg = wsp_cfg(
        tmp_path,
        "trainer.max_steps=100",
        "trainer.max_epochs=-1",
        "data.batch_size=32",
        "callbacks=[zero_shot]",
        "data.eval_test_size=200",
        "checkpoint.every_n_steps=0",  # last.ckpt then holds the final step (Lightning skips it after a periodic one)
    )
    metrics = train(cfg)
    run_dir = metrics["run_dir"]
    with open(f"{run_dir}/csv/metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 100
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.2  # the contrastive loss falls
    assert metrics["eval/zero_shot_top1"] > 30.0  # 10 classes: chance is 10%

    # eval.py on the final checkpoint gives the callback's number and the chance level
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        eval_cfg = compose("eval", overrides=[f"ckpt={run_dir}/checkpoints/last.ckpt", "eval=zero_shot"])
    found = evaluate(eval_cfg)
    assert found["global_step"] == 100
    assert found["eval/zero_shot_top1"] == pytest.approx(metrics["eval/zero_shot_top1"], abs=1e-6)
    assert found["eval/zero_shot_chance"] == pytest.approx(10.0)
