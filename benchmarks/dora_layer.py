"""Benchmark fedsim's DoRA linear layer against HF PEFT's DoRA and plain LoRA layers.

DoRA is Liu et al., arXiv 2402.09353; the factored norm and fused epilogues follow Zelenin and
Zhuravlyova, "Scaling DoRA", arXiv 2603.22276. For every (rank, tokens) case this script times a
training-mode forward and a forward plus backward of one square linear layer, and measures the
peak extra memory of one forward plus backward.

Variants: ``fedsim`` (factored norm, ``kernel="auto"``: Triton epilogues on CUDA, PyTorch on CPU),
``fedsim-dense`` (norm from ``W + s·B·A``), on CUDA also ``fedsim-torch`` (factored norm, PyTorch
epilogues), ``peft-dora`` (``LoraConfig(use_dora=True)``) and ``peft-lora`` (the floor).

Set-up shared by all variants: float32 on CPU and bfloat16 on CUDA, with base weight and input
drawn from N(0, 1). Adapters have a non-zero ``B``, so the norm is not trivial, and dropout is 0.
``x`` requires grad, as for a layer inside a network. Modules are in training mode, so every
forward recomputes the norm, as after each optimizer step. Times are medians over ``--repeats``
runs after one warm-up.

Peak extra memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the level before the pass. On
CPU, :class:`fedsim.dora.probe.AllocationProbe`, a ``TorchDispatchMode`` that counts the bytes of
tensor storages created during the pass and alive at once. It includes the output and all gradients,
and excludes scratch memory inside single operations (BLAS workspaces) and the inputs and weights
that exist before the pass.

Run ``python benchmarks/dora_layer.py`` (CPU, about 3 minutes on 2 cores) or
``python benchmarks/dora_layer.py --device cuda``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.dora import DoRALinear  # noqa: E402
from fedsim.dora.probe import AllocationProbe  # noqa: E402

MIB = 1024 * 1024


def _make_base(dim: int, dtype: torch.dtype, device: str) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(dim, dim, bias=True)
    with torch.no_grad():
        linear.weight.normal_()
    return linear.to(device=device, dtype=dtype)


def _build_fedsim(base: nn.Linear, rank: int, **options) -> nn.Module:
    layer = DoRALinear.from_linear(base, rank, 2 * rank, seed=0, **options)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.01)
    return layer


def _build_peft(base: nn.Linear, rank: int, use_dora: bool) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], use_dora=use_dora)
    model = peft.get_peft_model(nn.Sequential(base), config)
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_(std=0.01)
    return model


def _variants(device: str) -> dict[str, Callable[[nn.Linear, int], nn.Module]]:
    variants: dict[str, Callable[[nn.Linear, int], nn.Module]] = {
        "fedsim": lambda base, rank: _build_fedsim(base, rank),
        "fedsim-dense": lambda base, rank: _build_fedsim(base, rank, norm="dense"),
    }
    if device == "cuda":
        variants["fedsim-torch"] = lambda base, rank: _build_fedsim(base, rank, kernel="torch")
    variants["peft-dora"] = lambda base, rank: _build_peft(base, rank, use_dora=True)
    variants["peft-lora"] = lambda base, rank: _build_peft(base, rank, use_dora=False)
    return variants


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clear_grads(module: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for parameter in module.parameters():
        parameter.grad = None


def _time_once(fn: Callable[[], None], device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _peak_extra_mib(
    module: nn.Module, x: torch.Tensor, upstream: torch.Tensor, device: str
) -> float:
    _clear_grads(module, x)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        module(x).backward(upstream)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        with AllocationProbe() as probe:
            module(x).backward(upstream)
        peak = probe.peak_bytes
    _clear_grads(module, x)
    return peak / MIB


def run_case(
    variants: dict[str, Callable[[nn.Linear, int], nn.Module]],
    dim: int,
    rank: int,
    tokens: int,
    dtype: torch.dtype,
    device: str,
    repeats: int,
) -> list[dict]:
    """Measure every variant at one (rank, tokens) case and return one result row per variant.

    Timed runs go round-robin over the variants (one run of each, then the next round), so a change
    in background load affects all variants alike.
    """
    modules = {
        name: build(_make_base(dim, dtype, device), rank).train()
        for name, build in variants.items()
    }
    generator = torch.Generator(device="cpu").manual_seed(1)
    x = (
        torch.randn(tokens, dim, generator=generator)
        .to(device=device, dtype=dtype)
        .requires_grad_(True)
    )
    upstream = torch.randn(tokens, dim, generator=generator).to(device=device, dtype=dtype)

    def forward(module: nn.Module) -> Callable[[], None]:
        return lambda: module(x)

    def forward_backward(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            _clear_grads(module, x)
            module(x).backward(upstream)

        return run

    samples: dict[str, dict[str, list[float]]] = {
        name: {"forward": [], "forward_backward": []} for name in modules
    }
    for kind, make in (("forward", forward), ("forward_backward", forward_backward)):
        for module in modules.values():
            _time_once(make(module), device)  # warm-up
        for _ in range(repeats):
            for name, module in modules.items():
                samples[name][kind].append(_time_once(make(module), device))

    rows = []
    for name, module in modules.items():
        rows.append(
            {
                "variant": name,
                "rank": rank,
                "tokens": tokens,
                "forward_ms": statistics.median(samples[name]["forward"]),
                "forward_backward_ms": statistics.median(samples[name]["forward_backward"]),
                "peak_extra_mib": _peak_extra_mib(module, x, upstream, device),
            }
        )
    return rows


def _print_table(rows: list[dict], device: str, dtype: torch.dtype, dim: int) -> None:
    print(
        f"\nDoRA layer benchmark: device={device}, dtype={str(dtype).removeprefix('torch.')}, d_in=d_out={dim}"
    )
    header = f"{'variant':<14}{'r':>5}{'tokens':>8}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}"
    header += f"{'fb/LoRA':>9}{'mem/LoRA':>10}{'fb/PEFT-DoRA':>14}"
    print(header)
    print("-" * len(header))
    by_case: dict[tuple[int, int], dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["rank"], row["tokens"]), {})[row["variant"]] = row

    for (rank, tokens), variants in by_case.items():
        lora = variants.get("peft-lora")
        dora = variants.get("peft-dora")
        for name, row in variants.items():
            time_vs_lora = (
                row["forward_backward_ms"] / lora["forward_backward_ms"] if lora else float("nan")
            )
            mem_vs_lora = (
                row["peak_extra_mib"] / lora["peak_extra_mib"]
                if lora and lora["peak_extra_mib"]
                else float("nan")
            )
            time_vs_dora = (
                row["forward_backward_ms"] / dora["forward_backward_ms"] if dora else float("nan")
            )
            row.update(
                time_vs_lora=time_vs_lora,
                memory_vs_lora=mem_vs_lora,
                time_vs_peft_dora=time_vs_dora,
            )
            print(
                f"{name:<14}{rank:>5}{tokens:>8}{row['forward_ms']:>10.1f}{row['forward_backward_ms']:>12.1f}"
                f"{row['peak_extra_mib']:>10.1f}{time_vs_lora:>8.2f}x{mem_vs_lora:>9.2f}x{time_vs_dora:>13.2f}x"
            )
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to run on")
    parser.add_argument("--dim", type=int, default=4096, help="in_features = out_features")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 384], help="adapter ranks")
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1, 2048], help="rows of the input"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per measurement (median)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)"
    )
    parser.add_argument("--variants", nargs="+", default=None, help="subset of variants to run")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows to this JSON file"
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("peft").setLevel(logging.ERROR)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    variants = _variants(args.device)
    if args.variants:
        unknown = set(args.variants) - set(variants)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
        variants = {name: build for name, build in variants.items() if name in args.variants}

    rows = []
    for rank in args.ranks:
        for tokens in args.tokens:
            rows.extend(
                run_case(variants, args.dim, rank, tokens, dtype, args.device, args.repeats)
            )

    _print_table(rows, args.device, dtype, args.dim)
    if args.json is not None:
        meta = {
            "device": args.device,
            "dtype": str(dtype),
            "dim": args.dim,
            "threads": args.threads,
        }
        if args.device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name()
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
