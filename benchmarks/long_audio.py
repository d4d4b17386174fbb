"""Wall time and peak memory of chunked DiffSep separation on long mixtures (CPU).

Each length runs in a fresh subprocess so that its peak RSS (``resource.getrusage``) is its own.
The model is an untrained ``ScoreModel`` (``--nf``, default 16) loaded through a temporary model
folder and ``DiffSepSeparation.from_hparams``, i.e. the same code path as a real model; the
mixture is random noise (speed and memory do not depend on the content).

    OMP_NUM_THREADS=1 python benchmarks/long_audio.py                      # 10 s, 60 s, 600 s
    OMP_NUM_THREADS=1 python benchmarks/long_audio.py --lengths 10 60 --steps 2 --chunk-seconds 4

Columns: audio length, number of chunks, network calls, wall time of ``separate_batch``,
real-time factor (wall / audio), peak RSS before separating (model + mixture loaded), peak RSS
at the end, and their difference. With chunking the difference should stay flat while the length
grows; only the input and output arrays (4 bytes x (1 + K) x samples) grow with the file.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_model_folder(folder, nf, seed=0):
    """A model folder with an untrained ScoreModel of width ``nf`` (the 8 kHz separation template)."""
    import torch

    from speechbrain_diffsep.ncsnpp import ScoreModel

    template = (ROOT / "hparams" / "separation_wsj0mix_8k.yaml").read_text()
    lines = [f"nf: {nf}" if line.startswith("nf:") else line for line in template.splitlines()]
    (Path(folder) / "hyperparams.yaml").write_text("\n".join(lines) + "\n")
    torch.manual_seed(seed)
    torch.save(ScoreModel(nf=nf).state_dict(), Path(folder) / "score_model.ckpt")


def worker(args):
    """Separate one mixture of ``args.seconds`` and print one JSON line of measurements."""
    import torch

    torch.set_num_threads(args.threads)
    from speechbrain_diffsep.chunking import chunk_bounds
    from speechbrain_diffsep.inference import DiffSepSeparation

    with tempfile.TemporaryDirectory() as folder:
        make_model_folder(folder, args.nf)
        model = DiffSepSeparation.from_hparams(source=folder, run_opts={"device": "cpu"})
    sr = int(model.hparams.sample_rate)
    n = int(args.seconds * sr)
    mix = 0.1 * torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    chunk = args.chunk_seconds if args.chunk_seconds > 0 else None
    before = peak_rss_mb()
    start = time.perf_counter()
    est = model.separate_batch(mix, num_steps=args.steps, seed=0, sampler=args.sampler,
                               chunk_seconds=chunk, overlap_seconds=args.overlap_seconds)
    wall = time.perf_counter() - start
    after = peak_rss_mb()
    chunks = len(chunk_bounds(n, int(chunk * sr), int(args.overlap_seconds * sr))) if chunk else 1
    print(json.dumps({
        "seconds": args.seconds, "chunks": chunks, "nfe": model.last_nfe, "wall_s": wall,
        "rtf": wall / args.seconds, "rss_before_mb": before, "rss_peak_mb": after,
        "rss_delta_mb": after - before, "finite": bool(torch.isfinite(est).all()), "shape": list(est.shape),
    }))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=float, nargs="+", default=[10, 60, 600], help="mixture lengths in seconds")
    p.add_argument("--nf", type=int, default=16, help="network width (paper: 128)")
    p.add_argument("--steps", type=int, default=2, help="sampler steps")
    p.add_argument("--sampler", default="pc")
    p.add_argument("--chunk-seconds", type=float, default=4.0, help="chunk length (0: whole file at once)")
    p.add_argument("--overlap-seconds", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    print(f"DiffSep chunked separation on CPU: nf={args.nf}, sampler={args.sampler}, steps={args.steps}, "
          f"chunk={args.chunk_seconds} s, overlap={args.overlap_seconds} s, threads={args.threads}")
    header = f"{'audio':>8} {'chunks':>6} {'NFE':>5} {'wall':>9} {'RTF':>6} {'RSS before':>11} {'RSS peak':>9} {'delta':>8}"
    print(header)
    print("-" * len(header))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    rows = []
    for seconds in args.lengths:
        cmd = [sys.executable, __file__, "--worker", "--seconds", str(seconds), "--nf", str(args.nf),
               "--steps", str(args.steps), "--sampler", args.sampler, "--chunk-seconds", str(args.chunk_seconds),
               "--overlap-seconds", str(args.overlap_seconds), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{seconds:>7g}s failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['seconds']:>7g}s {r['chunks']:>6d} {r['nfe']:>5d} {r['wall_s']:>8.1f}s {r['rtf']:>6.2f} "
              f"{r['rss_before_mb']:>8.0f} MB {r['rss_peak_mb']:>6.0f} MB {r['rss_delta_mb']:>5.0f} MB")
    return rows


if __name__ == "__main__":
    main()
