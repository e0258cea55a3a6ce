"""The prepared GPU suite: one run, one markdown table (and one JSON line) of what a GPU user needs to know.

Rows (each runs inside its own try/except, so one failure prints its one-line error in the table and the
others still run; a time guard skips the remaining rows once ``--budget-s`` seconds are used):

- **DINO ViT-S/16 step**: sslab's ``DINO`` module stepped as ``bench/dino_step.py`` steps it (student and
  teacher, loss, centre, backward, per-tensor clipping, AdamW, EMA) at 224 px with 2 x 224 + 8 x 96 crops and
  the paper's head (65536 prototypes), in bf16 autocast; views precomputed (model only), and with the
  kornia views made on the device. img/s and MFU.
- **MAE ViT-B/16 step**: sslab's ``MAE`` as ``bench/mae_step.py`` steps it, 224 px, mask 0.75, the paper's
  decoder (512-d x 8 blocks), bf16. img/s and MFU.
- **multi-crop views**: ``bench/views.py``'s batched kornia ``MultiCropViews`` on the device against its
  torchvision v2 per-sample pipeline, on the device and on the CPU with 1 thread (one DataLoader worker).
- **image-folder decode**: ``bench/decode.py``'s comparison of ``data.decode=cpu`` (PIL in DataLoader
  workers) and ``data.decode=gpu`` (workers read bytes, batched nvjpeg ``decode_jpeg`` + letterbox on the
  device) on JPEGs of 224-500 px, in images/s per CPU core.
- **k-NN 1M x 384**: ``sslab.evaluation.knn.knn_search`` with ``backend=auto`` (chunked matmul + top-k on
  the bank's device) and ``backend=faiss`` (FAISS-GPU when faiss-gpu is installed, else FAISS-CPU on fewer
  queries), with the recall of FAISS against auto.
- **MaskCut eigen-solve**: ``bench/maskcut.py``'s comparison (batched ``torch.linalg.eigh`` vs per image in
  torch and in scipy).
- **torch.compile DINO step**: the DINO step with ``sslab.precision.compile_model`` (what ``compile=true``
  does) against eager, compile time reported separately.
- **trainer=fsdp 2 steps**: a real ``python train.py trainer=fsdp trainer.devices=1`` subprocess.

MFU = model FLOPs per second / the GPU's dense bf16 peak. Model FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward of the student (DINO: and the
teacher's forward) at a small batch with the SDPA math kernel (so attention is counted as its matmuls),
scaled linearly to the timed batch. The peak comes from a table of GPU names (``--peak-tflops`` overrides);
on a CPU MFU is n/a.

``--device cpu --tiny`` runs every row at toy sizes (ViT depth 1, 32 px, batch 2, a 10k bank) as a smoke
test in well under a minute; its figures mean nothing. The exit status is 1 when a row failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    ROOT,
    START,
    compile_seconds,
    median,
    num_cores,
    print_json,
    setup,
    time_interleaved,
    torch_threads,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from the vendors' datasheets; the first
# pattern that matches torch.cuda.get_device_name() wins, so the specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.0),
    (r"H200", 989.0),
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100|H800", 989.0),  # SXM (torch names it "H100 80GB HBM3")
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"RTX 4090", 165.0),
)

ROWS = (
    "DINO ViT-S/16 step",
    "MAE ViT-B/16 step",
    "multi-crop views",
    "image-folder decode",
    "k-NN 1M x 384",
    "MaskCut eigen-solve",
    "torch.compile DINO step",
    "trainer=fsdp 2 steps",
)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real suite and the CPU smoke run (``--tiny``)."""

    image: int = 224
    local: int = 96
    patch: int = 16
    num_local: int = 8
    depth: int | None = None  # None: the architecture's own depth
    dino_batch: int = 128
    dino_head: tuple[int, int, int] = (2048, 256, 65536)  # hidden, bottleneck, prototypes (the paper's)
    mae_batch: int = 256
    mae_decoder: tuple[int, int, int] = (512, 8, 16)  # width, depth, heads (the paper's)
    views_batch: int = 32  # the per-sample CPU baseline takes ~0.3 s per 224 px image
    bank: int = 1_000_000
    dim: int = 384
    queries: int = 10_000
    faiss_cpu_queries: int = 1_000
    maskcut: dict[str, int] = field(
        default_factory=lambda: {
            "images": 256,
            "batch_size": 64,
            "image_size": 224,
            "patch_size": 16,
            "depth": 4,
        }
    )
    decode: dict[str, int] = field(
        default_factory=lambda: {
            "images": 512,
            "min_px": 224,
            "max_px": 500,
            "load_size": 320,
            "batch_size": 64,
            "workers": 4,
        }
    )
    fsdp_batch: int = 64
    warmup: int = 3
    reps: int = 10
    flop_batch: int = 4  # batch at which FLOPs are counted (then scaled linearly)


FULL = Sizes()
TINY = Sizes(
    image=32,
    local=16,
    patch=8,
    num_local=2,
    depth=1,
    dino_batch=2,
    dino_head=(64, 32, 256),
    mae_batch=2,
    mae_decoder=(32, 1, 2),
    views_batch=2,
    bank=10_000,
    queries=100,
    faiss_cpu_queries=100,
    maskcut={"images": 4, "batch_size": 2, "image_size": 32, "patch_size": 8, "depth": 1},
    decode={"images": 8, "min_px": 48, "max_px": 96, "load_size": 64, "batch_size": 4, "workers": 0},
    fsdp_batch=8,
    warmup=1,
    reps=2,
    flop_batch=2,
)


@dataclass
class Row:
    """One table row: what ran, the figures as text, the MFU as text, and the numbers for the JSON line."""

    setting: str
    result: str
    mfu: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    sizes: Sizes
    peak_tflops: float | None
    peak_source: str
    deadline: float  # time.perf_counter() value after which rows are skipped

    def amp(self) -> AbstractContextManager:
        if self.args.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()


# -- helpers shared with bench/cost_model.py ------------------------------------------------------------


def peak_tflops_for(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak used for MFU and where it came from; None on a CPU or an unknown GPU."""
    if override:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, "CPU: no tensor-core peak"
    name = torch.cuda.get_device_name(device)
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops, f"{name} (datasheet, dense bf16)"
    return None, f"{name} is not in the peak table; pass --peak-tflops"


def count_flops(fn: Callable[[], torch.Tensor]) -> int:
    """FLOPs of ``fn()`` (which returns a scalar loss) and of its backward, as torch's flop counter sees them
    (matmuls, convolutions; attention as its two matmuls through the SDPA math kernel, so the count does
    not depend on which fused kernel the GPU would pick). Elementwise work is not counted, as usual for MFU."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn().backward()
    return int(counter.get_total_flops())


def build_dino(
    device: torch.device,
    batch: int,
    image: int,
    local: int,
    num_local: int,
    patch: int,
    depth: int | None,
    head: tuple[int, int, int],
    backbone: str = "vit_s",
):
    """bench/dino_step.py's sslab side (the real DINO module, built from the Hydra config) at these sizes."""
    import dino_step

    from sslab.build import build_datamodule

    overrides = [
        f"backbone={backbone}",
        f"data.image_size={image}",
        f"data.local_crop_size={local}",
        f"data.patch_size={patch}",
        f"method.hidden_dim={head[0]}",
        f"method.bottleneck_dim={head[1]}",
        f"method.out_dim={head[2]}",
        "method.use_bn_in_head=false",  # the paper's ViT setting
    ]
    if depth:
        overrides.append(f"++backbone.depth={depth}")
    cfg = dino_step.compose_config(
        argparse.Namespace(batch_size=batch, num_local=num_local, override=overrides)
    )
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    side = dino_step.SSLabSide(cfg, dm, device)
    side.opt = train_optimizer(side.model, device, (0.9, 0.999))
    return side


def train_optimizer(model, device: torch.device, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW as train.py builds it (``SSLMethod.configure_optimizers``: fused on CUDA), in place of the bench
    scripts' default one, which stays as it is there for the like-for-like comparison with lightly."""
    return torch.optim.AdamW(model.param_groups(), lr=1e-4, betas=betas, fused=device.type == "cuda")


def dino_flops_per_image(side, views: list[torch.Tensor], n: int) -> float:
    """Model FLOPs per source image of one DINO step (student forward + backward, teacher forward, head and
    loss), counted on the first ``n`` images of ``views``."""
    model = side.model
    crops = [v[:n] for v in views]
    flops = count_flops(lambda: model.step({"image": crops[0], "views": crops})["loss"])
    side.opt.zero_grad()
    return flops / n


def source_images(n: int, size: int) -> torch.Tensor:
    """uint8 Fashion-MNIST images at ``size`` px, as bench/views.py makes them."""
    import views

    return views.source_images(n, size)


# -- the rows --------------------------------------------------------------------------------------------


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def mfu_text(ctx: Context, flops_per_s: float) -> tuple[str, float | None]:
    if ctx.peak_tflops is None:
        return "n/a", None
    mfu = flops_per_s / (ctx.peak_tflops * 1e12)
    return f"{100 * mfu:.1f}%", round(mfu, 4)


def dino_row(ctx: Context) -> Row:
    s, device = ctx.sizes, ctx.device
    side = build_dino(device, s.dino_batch, s.image, s.local, s.num_local, s.patch, s.depth, s.dino_head)
    images = source_images(s.dino_batch, s.image).to(device)
    fixed = side.make_views(images)
    flops_img = dino_flops_per_image(side, fixed, min(s.flop_batch, s.dino_batch))

    def model_only() -> None:
        with ctx.amp():
            side.step(images, fixed)

    def with_views() -> None:
        v = side.make_views(images)  # outside autocast, as Lightning makes them (on_after_batch_transfer)
        with ctx.amp():
            side.step(images, v)

    times = time_interleaved({"model": model_only, "views": with_views}, s.warmup, s.reps, device)
    ips = {k: s.dino_batch / median(v) for k, v in times.items()}
    text, mfu = mfu_text(ctx, flops_img * ips["model"])
    depth = f", depth {s.depth}" if s.depth else ""
    return Row(
        f"batch {s.dino_batch}, 2 x {s.image} + {s.num_local} x {s.local} px{depth}, head {s.dino_head[2]}, "
        f"{ctx.args.precision}; {flops_img / 1e9:.1f} GFLOP/img",
        f"{fmt_rate(ips['model'])} img/s model only ({1e3 * median(times['model']):.1f} ms/step); "
        f"{fmt_rate(ips['views'])} img/s with kornia views",
        text,
        {
            "images_per_s_model_only": round(ips["model"], 2),
            "images_per_s_with_views": round(ips["views"], 2),
            "gflop_per_image": round(flops_img / 1e9, 3),
            "mfu": mfu,
        },
    )


def mae_row(ctx: Context) -> Row:
    import mae_step

    from sslab.build import build_datamodule

    s, device = ctx.sizes, ctx.device
    dim, depth_dec, heads = s.mae_decoder
    overrides = [
        "backbone=vit_b",
        f"data.image_size={s.image}",
        f"data.patch_size={s.patch}",
        f"method.decoder_dim={dim}",
        f"method.decoder_depth={depth_dec}",
        f"method.decoder_heads={heads}",
    ]
    if s.depth:
        overrides.append(f"++backbone.depth={s.depth}")
    cfg = mae_step.compose_config(argparse.Namespace(batch_size=s.mae_batch, override=overrides))
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    side = mae_step.SSLabSide(cfg, dm, device)
    side.opt = train_optimizer(side.model, device, (0.9, 0.95))
    images = source_images(s.mae_batch, s.image).to(device)
    fixed = side.make_views(images)
    n = min(s.flop_batch, s.mae_batch)
    flops_img = count_flops(lambda: side.model.step({"views": fixed[:n]})["loss"]) / n
    side.opt.zero_grad()

    def model_only() -> None:
        with ctx.amp():
            side.step(images, fixed)

    times = time_interleaved({"model": model_only}, s.warmup, s.reps, device)
    ips = s.mae_batch / median(times["model"])
    text, mfu = mfu_text(ctx, flops_img * ips)
    depth = f", depth {s.depth}" if s.depth else ""
    return Row(
        f"batch {s.mae_batch}, {s.image} px, mask {cfg.method.mask_ratio}, decoder {dim}-d x {depth_dec}{depth}, "
        f"{ctx.args.precision}; {flops_img / 1e9:.1f} GFLOP/img",
        f"{fmt_rate(ips)} img/s model only ({1e3 * median(times['model']):.1f} ms/step)",
        text,
        {"images_per_s_model_only": round(ips, 2), "gflop_per_image": round(flops_img / 1e9, 3), "mfu": mfu},
    )


def views_row(ctx: Context) -> Row:
    import views

    from sslab.augment import MultiCropViews

    s, device = ctx.sizes, ctx.device
    images = views.source_images(s.views_batch, s.image)
    images_dev = images.to(device)
    ours = MultiCropViews(
        global_size=s.image, local_size=s.local, mean=views.MEAN, std=views.STD, num_local=s.num_local
    ).to(device)
    per_sample = views.PerSampleViews(s.image, s.local, s.num_local, pil=False)

    def cpu_worker() -> list[torch.Tensor]:
        with torch_threads(1):
            return per_sample(images)

    fns: dict[str, Callable[[], object]] = {"kornia": lambda: ours(images_dev)}
    if device.type == "cuda":
        fns["torchvision GPU"] = lambda: per_sample(images_dev)
    fns["torchvision CPU"] = cpu_worker
    times = time_interleaved(fns, 1, max(2, s.reps // 3), device)
    ips = {k: s.views_batch / median(v) for k, v in times.items()}
    parts = [f"kornia batched on {device.type}: {fmt_rate(ips['kornia'])} img/s"]
    if "torchvision GPU" in ips:
        g = ips["torchvision GPU"]
        parts.append(f"torchvision per sample on the GPU: {fmt_rate(g)} ({ips['kornia'] / g:.1f}x)")
    c = ips["torchvision CPU"]
    parts.append(f"per sample on 1 CPU thread: {fmt_rate(c)} ({ips['kornia'] / c:.1f}x)")
    return Row(
        f"{s.views_batch} images, 2 x {s.image} + {s.num_local} x {s.local} px crops each",
        "; ".join(parts),
        "",
        {f"images_per_s_{k.replace(' ', '_').lower()}": round(v, 2) for k, v in ips.items()},
    )


def decode_row(ctx: Context) -> Row:
    import decode

    d = dict(ctx.sizes.decode)
    ns = argparse.Namespace(**d, threads=ctx.args.threads, seed=0, warmup=1, reps=max(2, ctx.sizes.reps // 5))
    m = decode.measure(ns, ctx.device)
    per_core, ips, cores = m["per_core"], m["images_per_s"], m["cores"]
    ratio = per_core["gpu"] / per_core["cpu"]
    return Row(
        f"{d['images']} JPEGs of {d['min_px']}-{d['max_px']} px -> {d['load_size']} px letterbox, batch "
        f"{d['batch_size']}, {d['workers']} worker(s) per side",
        f"PIL in workers: {fmt_rate(ips['cpu'])} img/s on {cores['cpu']} core(s); decode_jpeg on "
        f"{ctx.device.type}: {fmt_rate(ips['gpu'])} img/s on {cores['gpu']} core(s); per core {ratio:.2f}x "
        f"(the workers alone read {fmt_rate(per_core['bytes'])} img/s per core); "
        f"valid boxes {'identical' if m['same_box'] else 'DIFFER'}, mean |pixel diff| {m['mean_diff']:.2f}",
        "",
        {
            "images_per_s_cpu_decode": round(ips["cpu"], 1),
            "images_per_s_device_decode": round(ips["gpu"], 1),
            "per_core_ratio": round(ratio, 3),
            "images_per_s_per_core_reading_bytes": round(per_core["bytes"], 1),
            "same_valid_boxes": m["same_box"],
        },
    )


def knn_row(ctx: Context) -> Row:
    import faiss

    from sslab.evaluation.knn import knn_search

    s, device, k = ctx.sizes, ctx.device, 20
    g = torch.Generator(device=device).manual_seed(0)
    bank = F.normalize(torch.randn(s.bank, s.dim, device=device, generator=g), dim=1)
    queries = F.normalize(torch.randn(s.queries, s.dim, device=device, generator=g), dim=1)
    faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    auto_engine = "torch matmul + top-k" if bank.is_cuda and not faiss_gpu else "FAISS"
    nq_faiss = s.queries if faiss_gpu else min(s.queries, s.faiss_cpu_queries)
    out: dict[str, Any] = {}

    def auto() -> None:
        out["auto"] = knn_search(bank, queries, k, "auto")[1]

    def flat() -> None:
        out["faiss"] = knn_search(bank, queries[:nq_faiss], k, "faiss")[1]

    knn_search(bank, queries[:10], k, "auto")  # warm-up (cuBLAS handles, allocator)
    reps = max(2, s.reps // 3)
    t_auto = median(time_interleaved({"auto": auto}, 0, reps, device)["auto"])
    t_faiss = median(time_interleaved({"faiss": flat}, 0, 1 if not faiss_gpu else reps, device)["faiss"])
    exact, approx = out["auto"][:nq_faiss], out["faiss"]
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx, exact, strict=True))
    recall = hits / exact.numel()
    q_auto, q_faiss = s.queries / t_auto, nq_faiss / t_faiss
    where = "FAISS-GPU" if faiss_gpu else "FAISS-CPU (no faiss-gpu)"
    return Row(
        f"bank {s.bank:,} x {s.dim}, k={k}; auto -> {auto_engine} on {device.type}",
        f"auto: {fmt_rate(q_auto)} queries/s ({s.queries:,} in {t_auto:.2f} s); {where} flat: "
        f"{fmt_rate(q_faiss)} queries/s ({nq_faiss:,} in {t_faiss:.2f} s), recall@{k} vs auto {recall:.3f}",
        "",
        {
            "queries_per_s_auto": round(q_auto, 1),
            "queries_per_s_faiss": round(q_faiss, 1),
            "faiss_gpu": faiss_gpu,
            "recall_faiss_vs_auto": round(recall, 4),
        },
    )


def maskcut_row(ctx: Context) -> Row:
    import maskcut

    s = ctx.sizes
    m = dict(s.maskcut)
    ns = argparse.Namespace(**m, n_masks=3, tau=0.15, warmup=1, reps=max(2, s.reps // 5))
    measured = maskcut.measure(ns, ctx.device)
    t = {k: median(v) for k, v in measured["times"].items()}
    n = m["images"]
    ours = t["sslab batched"]
    grid = m["image_size"] // m["patch_size"]
    return Row(
        f"{n} images {m['image_size']} px / patch {m['patch_size']} ({grid}x{grid}), 3 masks, batch "
        f"{m['batch_size']}",
        f"batched: {fmt_rate(n / ours)} img/s; per image torch: {fmt_rate(n / t['torch per image'])} "
        f"({t['torch per image'] / ours:.1f}x), scipy: {fmt_rate(n / t['scipy per image (reference)'])} "
        f"({t['scipy per image (reference)'] / ours:.1f}x); identical masks vs scipy {measured['same']}/{n}",
        "",
        {
            "images_per_s_batched": round(n / ours, 1),
            "speedup_vs_torch_per_image": round(t["torch per image"] / ours, 2),
            "speedup_vs_scipy_per_image": round(t["scipy per image (reference)"] / ours, 2),
            "identical": measured["same"],
        },
    )


def compile_row(ctx: Context) -> Row:
    from sslab.precision import compile_model, compile_unavailable_reason

    s, device = ctx.sizes, ctx.device
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    reason = compile_unavailable_reason(accelerator)
    if reason:
        raise RuntimeError(reason)
    sides = {}
    for name in ("eager", "compiled"):
        sides[name] = build_dino(
            device, s.dino_batch, s.image, s.local, s.num_local, s.patch, s.depth, s.dino_head
        )
    images = source_images(s.dino_batch, s.image).to(device)
    fixed = sides["eager"].make_views(images)
    torch._dynamo.reset()
    names = compile_model(sides["compiled"].model, accelerator)
    backend = ctx.args.compile_backend
    if backend != "inductor":  # the same modules, recompiled lazily with a cheaper backend (CPU smoke run)
        for name in names:
            sides["compiled"].model.get_submodule(name).compile(backend=backend)

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            with ctx.amp():
                sides[name].step(images, fixed)

        return run

    fns = {name: step(name) for name in sides}
    compile_s = compile_seconds(fns["compiled"], device)  # forward and backward graphs, both crop sizes
    times = time_interleaved(fns, s.warmup, s.reps, device)
    t = {k: median(v) for k, v in times.items()}
    ips = {k: s.dino_batch / v for k, v in t.items()}
    return Row(
        f"as the DINO row; compile_model ({len(names)} blocks, backend {backend}), {ctx.args.precision}",
        f"eager {fmt_rate(ips['eager'])} img/s, compiled {fmt_rate(ips['compiled'])} img/s "
        f"({t['eager'] / t['compiled']:.2f}x); compile time {compile_s:.1f} s",
        "",
        {
            "images_per_s_eager": round(ips["eager"], 2),
            "images_per_s_compiled": round(ips["compiled"], 2),
            "speedup": round(t["eager"] / t["compiled"], 3),
            "compile_s": round(compile_s, 1),
            "backend": backend,
        },
    )


FSDP_CPU_REFUSAL = "trainer=fsdp shards over CUDA GPUs"


def fsdp_row(ctx: Context) -> Row:
    s, device = ctx.sizes, ctx.device
    remaining = max(60.0, ctx.deadline + 30.0 - time.perf_counter())  # start-up alone takes ~20 s
    with tempfile.TemporaryDirectory(prefix="sslab-gpu-suite-") as tmp:
        overrides = [
            "trainer=fsdp",
            "trainer.devices=1",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "backbone=vit_s",
            "data.source=embedded",
            f"data.batch_size={s.fsdp_batch}",
            "logger=[csv]",
            "callbacks=[]",
            "final_eval.baselines=false",
            "checkpoint.every_n_steps=0",
            f"paths.output_dir={tmp}",
            f"hydra.run.dir={tmp}/run",
        ]
        if s.depth:
            overrides.append(f"++backbone.depth={s.depth}")
        env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(remaining, 300.0)
        )
        wall = time.perf_counter() - start
    setting = f"python train.py trainer=fsdp trainer.devices=1 trainer.max_steps=2 backbone=vit_s (28 px), batch {s.fsdp_batch}"
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != 0:
        last = err_lines[-1] if err_lines else f"exit status {proc.returncode}"
        if device.type == "cpu" and FSDP_CPU_REFUSAL in proc.stderr:
            return Row(
                setting, f"n/a on a CPU: train.py refuses in one line ({last.strip()})", "", {"ran": False}
            )
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"train.py exit {proc.returncode}: {last.strip()}")
    metrics = {}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            metrics = json.loads(line)
            break
    steps = metrics.get("global_step")
    if steps != 2:
        raise RuntimeError(f"train.py ran, but reports global_step={steps} (expected 2)")
    return Row(
        setting,
        f"2 steps OK (world size {metrics.get('world_size')}, fit {metrics.get('train_time_s')} s, process "
        f"{wall:.0f} s incl. start-up and checkpoint)",
        "",
        {"ran": True, "train_time_s": metrics.get("train_time_s"), "process_s": round(wall, 1)},
    )


ROW_FUNCTIONS: dict[str, Callable[[Context], Row]] = dict(
    zip(
        ROWS,
        (dino_row, mae_row, views_row, decode_row, knn_row, maskcut_row, compile_row, fsdp_row),
        strict=True,
    )
)


# -- driver ----------------------------------------------------------------------------------------------


def print_text_table(headers: list[str], rows: list[list[str]]) -> None:
    """A markdown table with every column left-aligned (the cells here are sentences, not numbers)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--tiny", action="store_true", help="toy sizes: a CPU smoke test of every row")
    p.add_argument(
        "--precision", choices=["bf16", "fp32"], default="bf16", help="autocast of the model steps"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak for MFU (default: from the GPU name)"
    )
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the remaining rows after this many s")
    p.add_argument("--threads", type=int, default=num_cores(), help="torch intra-op threads")
    p.add_argument("--only", action="append", default=[], help="run only rows whose name contains this")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of the compile row (default: inductor; aot_eager with --tiny on a CPU, "
        "where Inductor's C++ build alone takes over a minute)",
    )
    args = p.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.tiny and args.device == "cpu" else "inductor"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    torch.set_float32_matmul_precision("high")  # as train.py
    peak, peak_source = peak_tflops_for(device, args.peak_tflops)
    ctx = Context(args, device, TINY if args.tiny else FULL, peak, peak_source, START + args.budget_s)
    table, results, failed = [], {}, False
    for name, fn in ROW_FUNCTIONS.items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        used = time.perf_counter() - START
        start = time.perf_counter()
        if time.perf_counter() > ctx.deadline:
            row, status = (
                Row("", f"skipped: time guard ({used:.0f} s used of {args.budget_s:.0f} s)"),
                "skipped",
            )
        else:
            try:
                row, status = fn(ctx), "ok"
            except Exception as e:  # one row's failure must not stop the others
                traceback.print_exc(file=sys.stderr)
                first = (str(e).strip().splitlines() or [""])[0][:200]
                row, status, failed = Row("", f"error: {type(e).__name__}: {first}"), "error", True
        seconds = time.perf_counter() - start
        print(f"[{time.perf_counter() - START:5.0f} s] {name}: {status}", file=sys.stderr, flush=True)
        table.append([name, row.setting, row.result, row.mfu, f"{seconds:.1f}"])
        results[name] = {"status": status, "result": row.result, "seconds": round(seconds, 1), **row.data}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    mode = "tiny smoke sizes (figures mean nothing)" if args.tiny else "full sizes"
    peak_text = f"{peak:.0f} TFLOP/s bf16 peak from {peak_source}" if peak else f"MFU n/a: {peak_source}"
    print(f"\nsslab GPU suite on {gpu}, {mode}, torch {torch.__version__}, {peak_text}\n")
    print_text_table(["benchmark", "setting", "result", "MFU", "s"], table)
    print()
    print_json(
        {
            "bench": "gpu_suite",
            "device": args.device,
            "gpu": gpu,
            "tiny": args.tiny,
            "precision": args.precision,
            "peak_tflops": peak,
            "torch": torch.__version__,
            "threads": args.threads,
            "wall_s": round(time.perf_counter() - START, 1),
            "rows": results,
        }
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
