"""Process-wide settings: thread count, devices, training precision and the default folders.

Torch with 2 threads on a 2-core machine slows down 15-30x as soon as another process competes for
the cores, so the thread count is a setting (LLFC_THREADS) rather than torch's guess; tests and CI
use 1.

Training precision is one policy on every device (`training_precision`): bf16 autocast where the
hardware computes in bf16 natively (CUDA compute capability >= 8.0; a CPU with AVX-512 BF16 or AMX),
fp16 autocast with a gradient scaler on older GPUs (a T4 is 7.5), fp32 elsewhere; $LLFC_PRECISION
overrides it. Master weights, optimizer state and evaluation stay fp32 in every case.

Batch sizes from device memory (`fit_batch`): on a GPU a batch that does not fit its free memory runs as
micro-batches (training: gradients accumulated into one step), or a run that cannot fit even one sample
is refused before it starts. On the CPU nothing is measured and the batch is the one asked for.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def to_host(tensors) -> list[np.ndarray]:
    """Device tensors as host arrays in one transfer: one synchronisation at the end of a pass instead of one
    per layer, alpha or batch. Values travel as float64, exact for float32, float64 and integers below 2^53."""
    tensors = list(tensors)
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).cpu().numpy()
    ends = np.cumsum([t.numel() for t in tensors])[:-1]
    return [part.reshape(tuple(t.shape)) for part, t in zip(np.split(flat, ends), tensors)]


# ------------------------------------------------------------------------------------------ device memory
class DeviceMemoryError(RuntimeError):
    """A run does not fit in the device's free memory as it has to run (even one sample at a time, or for a
    BatchNorm network its whole batch at once); raised before the run starts."""


@dataclass(frozen=True)
class BatchPlan:
    """A batch of `batch_size` samples run as forward passes of at most `micro_batch` samples; in training
    their gradients are accumulated into one optimiser step (`accumulation` passes; 1: the batch as is)."""
    batch_size: int
    micro_batch: int

    @property
    def accumulation(self) -> int:
        return -(-self.batch_size // self.micro_batch)


# What the measured activations (`sample_memory`) are multiplied by. The count sees the tensors kept for the
# backward pass, or every layer's output in evaluation; it misses what lives beside them at the peak: the
# activation gradients of the backward pass (about one more copy of the largest layers), the caching
# allocator's block rounding and fragmentation, convolution workspaces, and in evaluation the temporaries of
# the measuring code (float64 copies of one layer at a time). Twice the count covers these.
MEMORY_SAFETY = 2.0


def free_memory(device) -> int | None:
    """Bytes free on `device` (`torch.cuda.mem_get_info`), or None where it cannot be asked (the CPU)."""
    device = torch.device(device)
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None


def sample_memory(model: torch.nn.Module, sample_shape, *, training: bool, samples: int = 2) -> float:
    """Bytes of activations one sample costs, measured with `samples` random samples on the CPU (the model
    runs on zero-filled CPU copies of its parameters, so a GPU model is neither copied nor changed). Training:
    every tensor autograd keeps for the backward pass, loss included; evaluation: every module's output,
    all held at once (as a pass that keeps every layer's features does). Distinct storages only, parameters
    and buffers not counted. Counted in fp32: under autocast most activations are 16-bit, so an upper bound."""
    params = {k: torch.zeros_like(v, device="cpu", requires_grad=training) for k, v in model.named_parameters()}
    state = {**params, **{k: torch.zeros_like(v, device="cpu") for k, v in model.named_buffers()}}
    weights = {v.untyped_storage().data_ptr() for v in state.values()}
    held: dict[int, int] = {}
    kept = []  # references: no storage is freed (and its address reused) before the count ends

    def note(t) -> None:
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in weights:
            kept.append(t)
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def pack(t):
        note(t)
        return t

    from torch.func import functional_call

    was_training = model.training
    handles = [] if training else [m.register_forward_hook(lambda m, i, out: note(out)) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=[]):  # the samples and dropout draw from the global RNG: restore it
            x, y = torch.randn(samples, *sample_shape), torch.zeros(samples, dtype=torch.long)
            model.train(training)
            if training:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    torch.nn.functional.cross_entropy(functional_call(model, state, (x,)).float(), y)
            else:
                with torch.no_grad():
                    functional_call(model, state, (x,))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sum(held.values()) / samples


def _bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB ({int(n):,} bytes)"


def fit_batch(model: torch.nn.Module, sample_shape, batch_size: int, device, *, training: bool = True,
              fixed_bytes: int = 0, models: int = 1, what: str = "this run") -> BatchPlan:
    """How a batch of `batch_size` samples fits in `device`'s free memory: the batch as is when it fits,
    else passes of the largest equal size that does (`micro_batch`; training accumulates their gradients).
    Needed: `fixed_bytes` (what the run allocates besides activations: gradients, optimizer state) plus
    MEMORY_SAFETY x `models` (networks whose activations are held at once) x `sample_memory` per sample.
    Raises DeviceMemoryError, naming `what`, the memory needed and the memory free, when even one sample
    does not fit. Where free memory cannot be asked (the CPU) nothing is measured: the batch as is."""
    free = free_memory(device)
    if free is None:
        return BatchPlan(batch_size, batch_size)
    per_sample = MEMORY_SAFETY * models * sample_memory(model, sample_shape, training=training)
    fits = int((free - fixed_bytes) // per_sample) if per_sample > 0 else batch_size
    if fits < 1:
        raise DeviceMemoryError(
            f"{what} does not fit on {device} even one sample at a time: it needs {_bytes(fixed_bytes + per_sample)} "
            f"({_bytes(fixed_bytes)} fixed + {_bytes(per_sample)} per sample, {MEMORY_SAFETY:g} x the measured "
            f"activations), but {_bytes(free)} is free. Free memory on the device or use a larger one.")
    passes = -(-batch_size // min(fits, batch_size))
    return BatchPlan(batch_size, -(-batch_size // passes))  # equal passes: 500 in 260s is 2 x 250
