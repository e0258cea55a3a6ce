"""``python -m sslab.embed``: real image files written by PIL (a tree with a flat top level, several modes and
sizes, a duplicate, a broken file) embedded with a checkpoint, compared with the method's ``embed_uint8``,
and searched through the FAISS index."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from sslab.data.imagefolder import load_image
from sslab.embed import embed_folder
from sslab.errors import SSLabError
from tests.conftest import ROOT, TINY
from tests.test_export import tiny_checkpoint


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("dino"), TINY)  # Fashion-MNIST config: 28 px, 1 channel


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        root / "sub" / "b.jpg", quality=95
    )
    Image.fromarray(rng.integers(0, 255, (50, 20), dtype=np.uint8), "L").save(
        root / "sub" / "deeper" / "c.png"
    )
    Image.fromarray(rng.integers(0, 255, (33, 33, 4), dtype=np.uint8), "RGBA").save(root / "d.png")
    shutil.copy(root / "a.png", root / "sub" / "a_copy.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


EXPECTED = ["a.png", "d.png", "sub/a_copy.png", "sub/b.jpg", "sub/deeper/c.png"]  # sorted, broken one skipped


def test_npy_rows_match_the_methods_embed_and_the_index_finds_duplicates(dino, folder, tmp_path):
    model, ckpt = dino
    out = tmp_path / "out" / "emb.npy"
    result = embed_folder(ckpt, folder, out, index=True, batch_size=2, progress=False)
    assert [str(Path(p).relative_to(folder)) for p in result["paths"]] == EXPECTED
    assert list(result["skipped"]) == [str(folder / "broken.jpg")]
    emb = np.load(out)
    assert emb.shape == (5, model.backbone.embed_dim) and emb.dtype == np.float32
    assert (tmp_path / "out" / "emb.paths.txt").read_text().splitlines() == result["paths"]
    # the method's own evaluation path: imagefolder decoding (long side 10/7 x 28 = 40) -> embed_uint8
    uint8 = torch.stack([load_image(Path(p), 40, 1) for p in result["paths"]])
    torch.testing.assert_close(torch.from_numpy(emb), model.embed_uint8(uint8), atol=1e-5, rtol=0)
    index = faiss.read_index(str(tmp_path / "out" / "emb.faiss"))
    assert index.ntotal == 5
    query = emb[:1] / np.linalg.norm(emb[:1])
    sims, ids = index.search(query.astype(np.float32), 2)
    assert sorted(ids[0].tolist()) == [0, 2]  # a.png finds itself and its copy
    assert np.allclose(sims[0], 1.0, atol=1e-5)


def test_parquet(dino, folder, tmp_path):
    _, ckpt = dino
    out = tmp_path / "emb.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(SSLabError, match=r"needs pyarrow, which is not installed; write out=.*emb\.npy"):
            embed_folder(ckpt, folder, out, progress=False)
        assert not out.exists()
        return
    import pyarrow.parquet as pq

    result = embed_folder(ckpt, folder, out, progress=False)
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == result["paths"]
    np.testing.assert_array_equal(
        np.array(table.column("embedding").to_pylist(), np.float32), result["embeddings"]
    )


def test_bad_input_is_one_line(dino, tmp_path):
    _, ckpt = dino
    (tmp_path / "empty").mkdir()
    with pytest.raises(SSLabError, match="no image files"):
        embed_folder(ckpt, tmp_path / "empty", tmp_path / "e.npy", progress=False)
    with pytest.raises(SSLabError, match="is not a directory"):
        embed_folder(ckpt, tmp_path / "missing", tmp_path / "e.npy", progress=False)
    with pytest.raises(SSLabError, match=r"write \.parquet"):
        embed_folder(ckpt, tmp_path, tmp_path / "e.csv", progress=False)


def test_command_line_with_progress_bar(dino, folder, tmp_path):
    _, ckpt = dino
    out = tmp_path / "emb.npy"
    run = subprocess.run(
        [sys.executable, "-m", "sslab.embed", f"ckpt={ckpt}", f"data.path={folder}", f"out={out}", "index=true",
         "data.batch_size=2"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "wrote 5 embeddings" in run.stdout and "skipped 1 undecodable" in run.stdout
    assert "embedding 6 images" in run.stderr  # the progress bar (rich, on stderr)
    assert np.load(out).shape[0] == 5 and (tmp_path / "emb.faiss").is_file()
