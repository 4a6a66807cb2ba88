import gzip
import hashlib
import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from llfc_core import data


@pytest.fixture(scope="module")
def mnist():
    return {s: data.load("mnist", s) for s in ("train", "test")}


@pytest.fixture(scope="module")
def cifar():
    return {s: data.load("cifar10", s) for s in ("train", "test")}


def test_mnist_shapes_balance_checksum(mnist):
    tr, te = mnist["train"], mnist["test"]
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    counts = torch.bincount(tr.labels, minlength=10)
    assert counts.min() >= 5000 and counts.max() <= 7000 and counts.sum() == 60000
    assert tr.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the canonical first labels
    assert hashlib.sha256(tr.images[:100].numpy().tobytes()).hexdigest()[:16] == "c8d7b3ac57a59fa4"
    assert "offline copy" in tr.source


def test_cifar_shapes_balance_checksum(cifar):
    tr, te = cifar["train"], cifar["test"]
    assert tr.images.shape == (50000, 3, 32, 32) and te.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(tr.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(te.labels, minlength=10).tolist() == [1000] * 10
    assert hashlib.sha256(te.images[:100].numpy().tobytes()).hexdigest()[:16] == "a2d3124f5b8a37f9"
    assert "cifar10-jpeg" in tr.source


def _write_idx(path, array, compress=True, truncate=0):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = (header + array.astype(np.uint8).tobytes())[: -truncate or None]
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _mnist_folder(tmp_path, n=20, **kw):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)), **kw)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return folder


def test_explicit_path_reads_tiny_idx(tmp_path):
    ds = data.load("mnist", "test", path=_mnist_folder(tmp_path))
    assert ds.images.shape == (20, 1, 28, 28) and ds.source.startswith("explicit path")


def test_truncated_idx_names_file(tmp_path):
    folder = _mnist_folder(tmp_path, truncate=5)
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz is truncated"):
        data.load("mnist", "test", path=folder)


def test_corrupt_gzip_names_file(tmp_path):
    folder = _mnist_folder(tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", "test", path=folder)


def test_bad_magic(tmp_path):
    folder = _mnist_folder(tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04abcd"))
    with pytest.raises(data.DataError, match="bad magic"):
        data.load("mnist", "test", path=folder)


def test_incomplete_official_copy_is_an_error(tmp_path):
    _mnist_folder(tmp_path)  # 20 test images under <root>/MNIST/raw: not the full set
    with pytest.raises(data.DataError, match="incomplete"):
        data.load("mnist", "test", root=tmp_path)


def test_corrupt_cifar_archive(tmp_path):
    bad = tmp_path / "cifar.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("test/cat/0001.jpg")
        payload = b"this is not a jpeg"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    bad.write_bytes(buf.getvalue()[:-20])
    with pytest.raises(data.DataError, match="cifar.tar.gz"):
        data.load("cifar10", "test", path=bad)


def test_cifar_pickle_loader_refuses_code(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": print}))
    with pytest.raises(data.DataError, match="refusing to load builtins.print"):
        data.load("cifar10", "test", path=folder)


def test_official_cifar_batches_are_read(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": images, b"labels": [3, 7]}))
    ds = data.load("cifar10", "test", path=folder)
    assert ds.images.shape == (2, 3, 32, 32) and ds.labels.tolist() == [3, 7]
    assert torch.equal(ds.images[1].flatten(), torch.from_numpy(images[1]))


def test_missing_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "repo_root", lambda: tmp_path)
    with pytest.raises(data.DataError, match="no copy of mnist/test found"):
        data.load("mnist", "test", root=tmp_path / "nowhere")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("imagenet", "train")


def test_import_and_load_without_torchvision():
    """torchvision absent or broken must not matter: the core never imports it unless downloading."""
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "import llfc_core, llfc_core.data as d, llfc_core.book.tables, llfc_core.book.chapter, llfc_core.metrics, llfc_core.matching\n"
            "print(d.load('mnist', 'test').images.shape)\n"
            "try:\n    d.load('mnist', 'test', root='/nonexistent', download=True)\n"
            "except d.DataError as e:\n    print('clear error:', 'torchvision' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([10000, 1, 28, 28])" in out.stdout and "clear error: True" in out.stdout


def test_batches_cover_data_once_and_are_seeded(mnist):
    ds = mnist["test"].subset(1000)
    seen = torch.cat([y for _, y in data.batches(ds, 128, shuffle=True, seed=3)])
    assert len(seen) == 1000 and torch.equal(seen.sort().values, ds.labels.sort().values)
    again = torch.cat([y for _, y in data.batches(ds, 128, shuffle=True, seed=3)])
    other = torch.cat([y for _, y in data.batches(ds, 128, shuffle=True, seed=4)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def test_crop_flip_matches_per_sample_definition():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(x, g, pad=2)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        crop = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def _warp(x, degrees=0.0, zoom=1.0, shift=(0.0, 0.0), flip=False):
    n = len(x)
    return data.affine_warp(x, torch.full((n,), float(degrees)), torch.full((n,), float(zoom)),
                            torch.tensor([shift] * n, dtype=torch.float32), torch.full((n,), flip))


def test_affine_warp_is_exact_on_pixel_grid_maps():
    """Identity, flip, whole-pixel shifts, quarter turns and a 2x zoom map pixel centres onto pixel centres,
    so bilinear resampling must reproduce the moved pixels exactly (the convention: about the image centre)."""
    x = torch.rand(3, 3, 8, 8) * 255
    assert torch.equal(_warp(x), x)
    assert torch.equal(_warp(x, flip=True), x.flip(-1))
    right = _warp(x, shift=(1.0, 0.0))  # output pixel j reads source pixel j + 1; the last column is outside: 0
    assert torch.equal(right[..., :-1], x[..., 1:]) and torch.all(right[..., -1] == 0)
    down = _warp(x, shift=(0.0, 2.0))
    assert torch.equal(down[..., :-2, :], x[..., 2:, :]) and torch.all(down[..., -2:, :] == 0)
    turned = _warp(x, degrees=90.0)
    quarter = [torch.rot90(x, k, (-2, -1)) for k in (1, 3)]
    assert min(float((turned - q).abs().max()) for q in quarter) < 1e-3  # cos(90 deg) is not exactly 0 in fp32
    assert torch.allclose(_warp(x, degrees=180.0), x.flip(-1).flip(-2), atol=1e-3)
    # zoom 2 about the centre: output pixels 2 and 5 of 8 (centred -1.5, +1.5) read source -0.75 / +0.75,
    # i.e. a quarter of the way between source pixels 2|3 and 4|5 (hand-computed bilinear weights)
    row = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    zoomed = _warp(row, zoom=2.0)
    assert zoomed[0, 0, 4, 2].item() == pytest.approx(2.75) and zoomed[0, 0, 4, 5].item() == pytest.approx(4.25)


def test_affine_warp_refuses_non_square_images():
    with pytest.raises(ValueError, match="square"):
        _warp(torch.zeros(1, 1, 4, 6))


def test_zoom_flip_rotate_draws_git_rebasin_ranges_and_fills_black():
    """augmax's RandomSizedCrop(zoom 0.8-1.2), HorizontalFlip, Rotate(+-30 deg) as released augmax runs them:
    a white image stays white in its middle, turns black only where a zoom-out or a rotation uncovers the
    outside; seeded; about half flipped; the local scale of every image is cos(angle) / zoom."""
    white = torch.full((400, 1, 32, 32), 255.0)
    out = data.zoom_flip_rotate(white, torch.Generator().manual_seed(0))
    assert torch.equal(out, data.zoom_flip_rotate(white, torch.Generator().manual_seed(0)))
    # the source of the centre pixel is at most 1.6 / 0.8 = 2 px off centre, reading 4 x 4 around it stays inside
    assert torch.allclose(out[..., 14:18, 14:18], white[..., 14:18, 14:18])
    black = (out < 1).float().mean(dim=(1, 2, 3))
    # some draws (zoom in, small angle) uncover nothing; a zoom-out to 0.8 shows at most 0.8^2 of the frame
    assert float(black.min()) == 0.0 and float(black.max()) > 0.3 and float(black.mean()) > 0.05
    # the draws are the documented ones, in order: log-zoom, x and y shifts, flip, angle
    g = torch.Generator().manual_seed(0)
    zoom = torch.exp(np.log(0.8) + (np.log(1.2) - np.log(0.8)) * torch.rand(400, generator=g))
    half = (32 * zoom - 32).abs() / 2
    shift = torch.stack([-half + 2 * half * torch.rand(400, generator=g), -half + 2 * half * torch.rand(400, generator=g)], 1)
    flip = torch.rand(400, generator=g) < 0.5
    degrees = -30 + 60 * torch.rand(400, generator=g)
    assert torch.allclose(out, data.affine_warp(white, degrees, zoom, shift, flip), atol=1e-3)
    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(400, 1, 32, 32).contiguous()
    moved = data.zoom_flip_rotate(ramp, torch.Generator().manual_seed(1))
    slope = (moved[..., 16, 17] - moved[..., 16, 14]).flatten() / 3  # d(source x)/d(output x) at the centre
    assert 0.35 < float((slope < 0).float().mean()) < 0.65  # flipped with p = 0.5
    # |slope| = cos(angle) / zoom lies in [cos 30 deg / 1.2, 1 / 0.8], and both ends are reached
    assert float(slope.abs().min()) > 0.866 / 1.2 - 0.02 and float(slope.abs().max()) <= 1 / 0.8 + 1e-4
    assert float(slope.abs().max()) > 1.15 and float(slope.abs().min()) < 0.8


def test_batches_apply_the_named_augmentation_and_refuse_unknown_names():
    ds = data.load("cifar10", "test").subset(64)
    plain = next(data.batches(ds, 16, seed=2))[0]
    warped = next(data.batches(ds, 16, augment="zoom-flip-rotate", seed=2))[0]
    again = next(data.batches(ds, 16, augment="zoom-flip-rotate", seed=2))[0]
    assert torch.equal(warped, again) and not torch.allclose(warped, plain)
    gen = torch.Generator().manual_seed(2)  # the same draws by hand: warp the raw images, then normalise
    assert torch.equal(warped, data.normalise(data.zoom_flip_rotate(ds.images[:16].float(), gen), "cifar10"))
    with pytest.raises(ValueError, match="unknown augmentation 'crop'"):
        next(data.batches(ds, 16, augment="crop"))
