"""Median wall time of one ScoreModel forward pass (no grad, eval mode) on CPU.

Default: a 4 s, 8 kHz, 2-source input (the sampler calls the network 60 times per mixture in the
paper's set-up), nf = 128 and nf = 64, 2 threads.

    python benchmarks/forward_speed.py                       # nf 128 and 64
    python benchmarks/forward_speed.py --nf 64 --repeats 5 --memory-format contiguous
    python benchmarks/forward_speed.py --nf 64 --dtype bf16 # bfloat16 autocast
    python benchmarks/forward_speed.py --nf 64 --compile    # torch.compile (slow first call)

For comparison, the authors' code took 6.12 s (nf=128) and 1.54 s (nf=64) per forward on the
2-core CPU this project is developed on (unloaded). On a CPU shared with other jobs, OpenMP's
spin-waiting makes 2 threads much slower than 1; run with ``OMP_WAIT_POLICY=PASSIVE`` there
(it must be set before Python starts) and compare against a baseline measured the same way.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from speechbrain_diffsep.ncsnpp import ScoreModel  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nf", type=int, nargs="+", default=[128, 64], help="backbone widths to time")
    parser.add_argument("--seconds", type=float, default=4.0, help="input duration in seconds")
    parser.add_argument("--sample-rate", type=int, default=8000)
    parser.add_argument("--num-sources", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    parser.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                        help="bf16: torch.autocast(cpu, bfloat16) around the forward")
    parser.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                        help="U-Net memory format (auto: channels_last on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--separate", metavar="SAMPLER:STEPS", nargs="*", default=[],
                        help="also time a whole separation of the input, e.g. pc:30 ode:5 (end to end)")
    return parser.parse_args(argv)


def time_forward(nf, args):
    """Median seconds per forward for one width, and the output (for sanity checks)."""
    torch.manual_seed(0)
    model = ScoreModel(num_sources=args.num_sources, nf=nf).eval().to(args.device)
    model.backbone.channels_last = {"auto": None, "channels_last": True, "contiguous": False}[args.memory_format]
    if args.compile:
        model.backbone = torch.compile(model.backbone)
    n = int(round(args.seconds * args.sample_rate))
    g = torch.Generator().manual_seed(1)
    y = torch.randn(args.batch, 1, n, generator=g).to(args.device)
    x = y / args.num_sources + 0.3 * torch.randn(args.batch, args.num_sources, n, generator=g).to(args.device)
    t = torch.full((args.batch,), 0.5, device=args.device)
    times, cpu_times = [], []
    dev_type = "cuda" if str(args.device).startswith("cuda") else "cpu"
    with torch.no_grad(), torch.autocast(dev_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        for i in range(args.warmup + args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(x, t, y)
            if dev_type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    for spec in args.separate:
        name, _, steps = spec.partition(":")
        from speechbrain_diffsep.pipeline import separate_mixture
        from speechbrain_diffsep.sde import MixingSDE

        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            est, nfe = separate_mixture(model, MixingSDE(num_sources=args.num_sources), y, sampler=name,
                                        num_steps=int(steps) if steps else None,
                                        generator=torch.Generator(device=args.device).manual_seed(0))
        if dev_type == "cuda":
            torch.cuda.synchronize()
        print(f"nf={nf}: separating {args.seconds:g} s with {name} ({nfe} network calls) took "
              f"{time.perf_counter() - start:.2f} s end to end")
    return times, cpu_times, out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, input {args.batch}x{args.num_sources}x"
        f"{args.seconds:g}s @ {args.sample_rate} Hz, dtype {args.dtype}, memory format {args.memory_format}, "
        f"compile {args.compile}"
    )
    for nf in args.nf:
        times, cpu_times, out = time_forward(nf, args)
        runs = ", ".join(f"{s:.3f}" for s in times)
        print(
            f"nf={nf}: median {statistics.median(times):.3f} s per forward (runs: {runs}; process CPU time "
            f"median {statistics.median(cpu_times):.3f} s); output finite: {bool(torch.isfinite(out).all())}"
        )


if __name__ == "__main__":
    main()
