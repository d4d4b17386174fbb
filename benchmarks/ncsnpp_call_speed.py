"""Latency of one paper-network call (NCSN++, nf=128, 4 s at 8 kHz, batch 1) under the settings that
can shorten it on a GPU, beyond the fp32 / TF32 / bf16 / compiled rows of ``gpu_check.py``:

* ``bf16``: autocast, NCHW (gpu_check's row, repeated here as the baseline of this run);
* ``bf16 channels_last``: the 2-D convolutions' weights (and so their activations) in NHWC, the
  layout of cuDNN's tensor-core kernels; no transposes around each convolution;
* ``compiled bf16 channels_last``: ``torch.compile`` (inductor) on top;
* ``compiled bf16 channels_last cudagraphs``: ``mode="reduce-overhead"``: the whole call replayed as
  one CUDA graph (possible since the call has no host sync and no graph break,
  ``tests/test_sync_free.py``), no per-kernel launch cost;
* ``bf16 batch B`` (``--batch``): B mixtures in one call, milliseconds per mixture (throughput).

Prints one line per mode and writes JSON + markdown to ``--out``::

    python benchmarks/ncsnpp_call_speed.py --out benchmarks/results/ncsnpp_call_speed_<card>
    python benchmarks/ncsnpp_call_speed.py --device cpu --quick --out /tmp/speed   # the CPU smoke run

Outputs are compared with the first mode's (relative L2 difference) so that a faster layout that
changes the result shows it.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_check import bf16_peak, call_inputs, card_name, gflop_per_call, paper_network, sync, timed  # noqa: E402

MODES = ["bf16", "bf16 channels_last", "compiled bf16 channels_last",
         "compiled bf16 channels_last cudagraphs", "bf16 batch"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="a tiny NCSN++ (nf=16, 1 s), the eager compile backend on CPU")
    p.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    p.add_argument("--batch", type=int, default=8, help="mixtures per call of the 'bf16 batch' mode")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA GPU; pass --device cpu --quick")
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # bf16 rows: no TF32 in fp32 ops
    try:
        return _run(args, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32


def _run(args, device):
    model, nf, seconds = paper_network(args.quick, device)
    n = int(seconds * 8000)
    gflop = gflop_per_call(model, *call_inputs(n, device))
    card = card_name(device)
    peak = bf16_peak(card) if device.type == "cuda" else None
    warmup, repeats = (1, args.repeats or 2) if args.quick else (5, args.repeats or 30)
    report = {"card": card, "torch": torch.__version__, "network": f"NCSN++ nf={nf}, {seconds:g} s at 8 kHz, 2 sources",
              "gflop_per_call": round(gflop, 1), "bf16_peak_tflops": peak, "modes": {}}
    ref = None
    backend = "eager" if args.quick and device.type == "cpu" else "inductor"
    for mode in args.modes:
        torch._dynamo.reset()
        batch = args.batch if mode == "bf16 batch" else 1
        net = model.to(memory_format=torch.channels_last if "channels_last" in mode else torch.contiguous_format)
        if mode.startswith("compiled"):
            net = torch.compile(net, backend=backend,
                                mode="reduce-overhead" if "cudagraphs" in mode and backend == "inductor" else None)
        xb, tb, yb = call_inputs(n, device, batch)

        def call():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return net(xb, tb, yb).float().clone()  # clone: a CUDA graph's output is overwritten on replay

        try:
            start = time.perf_counter()
            call()
            sync(device)
            first = time.perf_counter() - start
            sec, out = timed(call, device, warmup, repeats)
            out = out[:1]
            ref = out if ref is None else ref
            entry = {"batch": batch, "ms_per_call": round(1e3 * sec, 3), "ms_per_mixture": round(1e3 * sec / batch, 3),
                     "first_call_s": round(first, 1), "tflops": round(batch * gflop / sec / 1e3, 2),
                     "finite": bool(torch.isfinite(out).all()),
                     "rel_diff_vs_first_mode": round(float((out - ref).norm() / ref.norm().clamp_min(1e-12)), 5)}
            if peak:
                entry["pct_of_bf16_peak"] = round(100 * batch * gflop / sec / 1e3 / peak, 1)
        except Exception as err:  # report and go on (e.g. no compiler toolchain)
            entry = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        report["modes"][mode] = entry
        print(f"[ncsnpp_call_speed] {mode}: {entry}", flush=True)
    model.to(memory_format=torch.contiguous_format)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ncsnpp_call_speed.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        lines = [f"# One NCSN++ call on {card} ({report['network']}, {report['gflop_per_call']} GFLOP)", "",
                 f"torch {report['torch']}; `python benchmarks/ncsnpp_call_speed.py{' --quick' if args.quick else ''}`", "",
                 "| mode | batch | ms / call | ms / mixture | TFLOP/s | % of bf16 peak | first call s | rel. diff | finite |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for mode, e in report["modes"].items():
            if "error" in e:
                lines.append(f"| {mode} | error: {e['error']} |||||||")
            else:
                lines.append(f"| {mode} | {e['batch']} | {e['ms_per_call']} | {e['ms_per_mixture']} | {e['tflops']} | "
                             f"{e.get('pct_of_bf16_peak', '-')} | {e['first_call_s']} | {e['rel_diff_vs_first_mode']} | {e['finite']} |")
        (args.out / "ncsnpp_call_speed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    rep = main()
    sys.exit(1 if any("error" in e for e in rep["modes"].values()) else 0)
