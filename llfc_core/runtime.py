"""Process-wide settings: thread count, devices, training precision and the default folders.

Torch with 2 threads on a 2-core machine slows down 15-30x as soon as another process competes for
the cores, so the thread count is a setting (LLFC_THREADS) rather than torch's guess; tests and CI
use 1.

Training precision is one policy on every device (`training_precision`): bf16 autocast where the
hardware computes in bf16 natively (CUDA compute capability >= 8.0; a CPU with AVX-512 BF16 or AMX),
fp16 autocast with a gradient scaler on older GPUs (a T4 is 7.5), fp32 elsewhere; $LLFC_PRECISION
overrides it. Master weights, optimizer state and evaluation stay fp32 in every case.
"""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads from `n`, else from $LLFC_THREADS; returns the count in force."""
    if n is None and os.environ.get("LLFC_THREADS"):
        n = int(os.environ["LLFC_THREADS"])
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def default_device() -> torch.device:
    """CUDA when present, else CPU ($LLFC_DEVICE overrides)."""
    if os.environ.get("LLFC_DEVICE"):
        return torch.device(os.environ["LLFC_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISIONS = ("fp32", "bf16", "fp16")    # what training runs in (resolved)
PRECISION_CHOICES = PRECISIONS + ("auto",)  # what a recipe or $LLFC_PRECISION may ask for


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (x86 AVX-512 BF16 or AMX tiles), which is what makes
    bf16 autocast faster than fp32 here.

    `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is not used: it asks oneDNN whether bf16 *runs*, which
    it also does, emulated, on any AVX-512 CPU without bf16 instructions. Other CPUs (ARM, Apple) are
    reported as without: set LLFC_PRECISION=bf16 there to try it.
    """
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private helpers: fall back to the kernel's CPU flags
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(device=None, requested: str = "auto") -> str:
    """The precision training runs in on `device` (default: `default_device()`): 'fp32', 'bf16' or 'fp16'.

    $LLFC_PRECISION (fp32 | bf16 | fp16 | auto), when set, overrides `requested`. 'auto' resolves to
    'bf16' on CUDA with compute capability >= 8.0, 'fp16' on older CUDA devices (no bf16 tensor cores),
    'bf16' on a CPU with native bf16 (`cpu_has_native_bf16`), else 'fp32'. fp16 on the CPU is refused.
    """
    env = os.environ.get("LLFC_PRECISION") or None  # set but empty counts as unset
    for origin, value in (("requested precision", requested), ("$LLFC_PRECISION", env)):
        if value is not None and value not in PRECISION_CHOICES:
            raise ValueError(f"{origin} must be one of {', '.join(PRECISION_CHOICES)}; got {value!r}")
    choice = env or requested
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        if choice != "auto":
            return choice
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    if choice == "fp16" and device.type == "cpu":
        raise ValueError("fp16 training on the CPU is refused (fp16 needs a gradient scaler and CPUs gain "
                         "nothing over bf16, which needs none): use 'bf16' or 'fp32'"
                         + (" (the value came from $LLFC_PRECISION)" if env else ""))
    if choice == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    return choice


def device_name(device=None) -> str:
    """What the device is: the GPU's name, or the CPU's model name (recorded with every result)."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (mps)"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def repo_root() -> Path:
    """The checkout this package lives in (for an editable install), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def data_root() -> Path:
    """Where data sets live: $LLFC_DATA, else the repository's shipped `data/` folder."""
    return Path(os.environ.get("LLFC_DATA", repo_root() / "data"))


def cache_root() -> Path:
    """Where trained models and computed results are cached: $LLFC_CACHE, else `<repo>/.cache/llfc`."""
    return Path(os.environ.get("LLFC_CACHE", repo_root() / ".cache" / "llfc"))


def show_progress() -> bool:
    """Progress bars on unless $LLFC_PROGRESS=0 (CI logs stay readable)."""
    return os.environ.get("LLFC_PROGRESS", "1") != "0"


def progress(**kwargs):
    """A tqdm bar (a widget in notebooks when ipywidgets is there, text otherwise), or a silent one
    when $LLFC_PROGRESS=0; book builds turn bars off so no stderr lands in the rendered pages."""
    if not show_progress():
        from tqdm.std import tqdm

        return tqdm(disable=True, **kwargs)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns when ipywidgets is missing, then falls back to text
        from tqdm.auto import tqdm
    return tqdm(mininterval=1.0, **kwargs)


class exact_matmul(contextlib.ContextDecorator):
    """Full fp32 matrix products and convolutions on CUDA inside (TF32 off), restored afterwards: evaluation,
    metrics, BN reset and the invariance check compare numbers that TF32's 10-bit mantissa would blur
    (A100/H100 enable it for cuDNN by default). Training may use TF32. No effect on a CPU."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


def cross_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b (rows are observations) as a float64 sum for accumulating statistics over batches. On a GPU
    the product runs in fp32 and only the result is float64 (float64 matmuls run at 1/32 to 1/64 of fp32 on
    most GPUs); on the CPU it stays in float64 throughout, as every committed result was computed."""
    if a.is_cuda:
        with exact_matmul():  # fp32, not TF32
            return (a.float().T @ b.float()).double()
    return a.double().T @ b.double()
