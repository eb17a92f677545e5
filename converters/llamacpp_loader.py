"""The one way this package opens a GGUF in llama-cpp-python: safe on AMX, AVX-512 and AVX2-only CPUs.

Why (docs/llamacpp-amx.md): llama.cpp's CPU backend offers "extra buffer types" that repack weights
at load time for faster kernels: AMX tiles for Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS when the build
has AMX kernels, and the CPU_REPACK layouts (Q4_0, Q4_K, IQ4_NL, ...) on AVX2/AVX-512/NEON. Built
from source with GCC 12 on a CPU with AMX, the AMX kernels configure their tiles from a struct whose
row/column fields the compiler drops (GCC's ``_tile_loadconfig`` tells the optimiser it reads 8
bytes), so the first AMX matrix product faults and the process dies. Loading with
``llama_model_params.use_extra_bufts = false`` keeps every weight in the plain CPU buffer and the
portable kernels, which decode correctly everywhere.

The policy (:func:`resolve_extra_buffers`), set by the environment variable
``DSNOT_LLAMA_EXTRA_BUFTS`` for every command, test and benchmark (it reaches child processes too):

- ``off`` (default): never. Every CPU then runs llama.cpp's plain (non-repacking) kernels, so a
  validation's perplexity depends far less on which machine CI was given (the repacking kernels
  alone move Q4_0's perplexity by about 3e-4 relative on SmolLM2, docs/bench_llamacpp_loader.md),
  and nothing can reach the AMX path. It costs speed on the repacked types (Q4_0, Q4_K, IQ4_NL), nothing on F16/Q8_0/Q5_0.
- ``auto``: off only when the CPU reports AMX *and* the installed llama.cpp was built with AMX
  kernels (the crash), on otherwise: fastest, but numbers differ between machines.
- ``on``: llama.cpp's own default.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dsnot_deploy.errors import UserInputError

logger = logging.getLogger(__name__)

EXTRA_BUFTS_ENV = "DSNOT_LLAMA_EXTRA_BUFTS"
POLICIES = ("auto", "on", "off")
DEFAULT_POLICY = "off"
CPUINFO = Path("/proc/cpuinfo")

# Llama() reads its model parameters from llama_model_default_params() and has no argument for
# use_extra_bufts; open_llama() swaps that function for the duration of one construction.
_CONSTRUCT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExtraBuffers:
    """Whether llama.cpp may use its extra (repacking) buffer types, and why."""

    enabled: bool
    policy: str
    reason: str


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_amx(flags: frozenset[str]) -> bool:
    """AMX as the kernel reports it (``amx_tile`` plus ``amx_int8``, which ggml's AMX kernels use)."""
    return "amx_tile" in flags and "amx_int8" in flags


@lru_cache(maxsize=1)
def build_features() -> frozenset[str]:
    """Features the installed llama.cpp was compiled with (``llama_print_system_info``: ``AMX_INT8 = 1``...)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    found = set()
    for part in info.replace("\n", "|").split("|"):
        name, sep, value = part.partition("=")
        if sep and value.strip() == "1":
            found.add(name.strip().split(":")[-1].strip())
    return frozenset(found)


def requested_policy() -> str:
    """The policy from ``DSNOT_LLAMA_EXTRA_BUFTS`` (default ``off``); UserInputError for other values."""
    value = os.environ.get(EXTRA_BUFTS_ENV, DEFAULT_POLICY).strip().lower() or DEFAULT_POLICY
    if value not in POLICIES:
        raise UserInputError(f"expected {EXTRA_BUFTS_ENV} in {POLICIES}, found {value!r}")
    return value


def resolve_extra_buffers(policy: str | None = None, flags: frozenset[str] | None = None,
                          build: frozenset[str] | None = None) -> ExtraBuffers:
    """Decide ``use_extra_bufts`` (see the module docstring). ``flags``/``build`` default to this machine."""
    policy = requested_policy() if policy is None else policy
    if policy not in POLICIES:
        raise UserInputError(f"expected an extra-buffer policy in {POLICIES}, found {policy!r}")
    if policy == "off":
        return ExtraBuffers(False, policy, "portable kernels on every CPU (the default; docs/llamacpp-amx.md)")
    if policy == "on":
        return ExtraBuffers(True, policy, f"{EXTRA_BUFTS_ENV}=on")
    flags = cpu_flags() if flags is None else flags
    if not cpu_has_amx(flags):
        return ExtraBuffers(True, policy, "CPU without AMX")
    build = build_features() if build is None else build
    if "AMX_INT8" not in build:
        return ExtraBuffers(True, policy, "CPU with AMX, llama.cpp built without AMX kernels")
    return ExtraBuffers(False, policy, "CPU with AMX and llama.cpp built with AMX kernels (docs/llamacpp-amx.md)")


def llamacpp_version() -> str:
    """``llama-cpp-python X.Y.Z`` (its vendored llama.cpp is fixed by that version), or 'not installed'."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed"
    return f"llama-cpp-python {llama_cpp.__version__}"


GPU_BUILD_HINT = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                  "llama-cpp-python==0.3.36")


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU (``llama_supports_gpu_offload``)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def check_gpu_layers(n_gpu_layers: int) -> int:
    """``n_gpu_layers`` (0 = CPU, -1 = every layer, N = that many layers) checked: a whole number >= -1, and
    for N != 0 a llama.cpp build with GPU offload. A CPU-only build is an error, not a warning: llama.cpp
    would silently run every layer on the CPU, hours for an 8B model where the GPU was asked for."""
    if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
        raise UserInputError(f"expected --gpu-layers to be -1 (all layers), 0 (CPU) or a number of layers, "
                             f"found {n_gpu_layers!r}")
    if n_gpu_layers != 0 and not gpu_offload_supported():
        raise UserInputError(
            f"--gpu-layers {n_gpu_layers} asks llama.cpp to offload layers to a GPU, but the installed "
            f"{llamacpp_version()} was built without GPU offload (llama_supports_gpu_offload() is false); "
            f"pass --gpu-layers 0 to run on the CPU, or install a GPU build: {GPU_BUILD_HINT}")
    return n_gpu_layers


def open_llama(path: str | os.PathLike[str], *, n_ctx: int, n_batch: int | None = None, n_ubatch: int = 512,
               n_threads: int | None = None, logits_all: bool = False, vocab_only: bool = False,
               extra_buffers: ExtraBuffers | None = None, n_gpu_layers: int = 0) -> Any:
    """``llama_cpp.Llama`` for ``path`` with the extra-buffer policy applied (and verified).

    ``n_threads`` (default all CPUs) is used for single-token and batch decoding. ``n_gpu_layers``:
    layers offloaded to a GPU (0 = none, the default; -1 = all), checked by :func:`check_gpu_layers`.
    Raises UserInputError when llama-cpp-python is missing, has no GPU offload while layers are asked
    for, or llama.cpp refuses the file.
    """
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as low
        from llama_cpp import Llama
    except ImportError as exc:
        raise UserInputError(
            "expected llama-cpp-python (pinned 0.3.36) to be installed to run GGUF files, found it missing: "
            "pip install llama-cpp-python==0.3.36"
        ) from exc
    from .llamacpp_log import route_llamacpp_logs

    route_llamacpp_logs()
    check_gpu_layers(n_gpu_layers)
    choice = extra_buffers or resolve_extra_buffers()
    threads = n_threads or os.cpu_count() or 1
    batch = n_batch or n_ctx
    default_params = low.llama_model_default_params

    def params_with_policy() -> Any:
        params = default_params()
        params.use_extra_bufts = choice.enabled
        return params

    with _CONSTRUCT_LOCK:
        low.llama_model_default_params = params_with_policy
        try:
            llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=batch, n_ubatch=min(n_ubatch, batch),
                        n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                        vocab_only=vocab_only, n_gpu_layers=n_gpu_layers, verbose=False)
        except Exception as exc:  # llama.cpp refusing a file is the user's input
            raise UserInputError(f"llama.cpp could not load {str(path)!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            low.llama_model_default_params = default_params
    if bool(llm.model_params.use_extra_bufts) != choice.enabled:  # a future llama-cpp-python may build params elsewhere
        llm.close()
        raise RuntimeError(f"{llamacpp_version()} ignored use_extra_bufts={choice.enabled}; update open_llama")
    logger.debug("llama.cpp opened %s (n_ctx %d, %d threads, %d GPU layers, extra buffer types %s: %s; %s)",
                 Path(path).name, n_ctx, threads, n_gpu_layers, "on" if choice.enabled else "off", choice.reason,
                 llama_cpp.__version__)
    return llm


def describe_runtime() -> dict[str, Any]:
    """For reports: the llama.cpp version, this CPU's AMX and the extra-buffer decision."""
    flags = cpu_flags()
    choice = resolve_extra_buffers(flags=flags)
    return {"llamacpp": llamacpp_version(), "cpu_amx": cpu_has_amx(flags),
            "extra_buffer_types": choice.enabled, "extra_buffer_policy": choice.policy, "reason": choice.reason,
            "gpu_offload_supported": gpu_offload_supported()}
