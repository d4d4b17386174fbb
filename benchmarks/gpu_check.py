#!/usr/bin/env python3
"""One command that checks the package on a CUDA GPU and writes a markdown report.

    python benchmarks/gpu_check.py                              # one CUDA GPU, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick         # the same path on CPU (CI)
    python benchmarks/gpu_check.py --data /path/to/minimix      # bring the data (no flite there)

What it does, in order (each section is timed; a failing section is reported, not fatal):

1. **Data**: a small MiniMix (``recipes/MiniMix``; needs flite and espeak-ng) unless ``--data``
   points to one in the wsj0-2mix layout.
2. **Recipes under torchrun** (``recipes/WSJ0Mix/separation/train.py``, ``--nproc-per-node``
   processes, NCCL on CUDA and gloo on CPU) at ``--precision=bf16`` for about ``--steps`` training
   steps, then the test stage: ``diffsep.yaml`` (the paper's NCSN++, reduced epochs) and
   ``diffsep_tcn.yaml`` (the CPU configuration, diffsep_small.yaml, at Conv-TasNet's GPU size).
   Training examples per second and peak GPU memory come from ``benchmarks/recipe_probe.py``.
3. **Seconds per network call** of the paper network (NCSN++, nf=128, 4 s at 8 kHz, batch 1,
   2 sources) in fp32 (TF32 off), TF32, bf16 (autocast) and compiled (``torch.compile`` + bf16),
   with the FLOPs of one call (``torch.utils.flop_counter``) and the share of the card's bf16 peak.
4. **End to end**: seconds to separate a 4 s mixture with each bundled model folder
   (``pretrained/*``) and its default sampler, through ``DiffSepSeparation``; real-time factor.
5. **bf16 sampling**: every bundled model separates ``--mixtures`` test mixtures in fp32 and with
   the network under bf16 autocast (same seed); outputs must be finite and the mean SI-SDR within
   0.3 dB of fp32.

Writes ``gpu_check.md`` and ``gpu_check.json`` into ``--out`` (default
``benchmarks/results/gpu_check_<card>``); scratch files go to ``--work``. ``--quick`` shrinks
every size (tiny networks, 1 s signals, a few steps) so that ``--device cpu --quick`` runs in
about a minute: CI runs it (tests/test_benchmarks.py) so the script never rots.
"""

import argparse
import glob
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "WSJ0Mix" / "separation"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes" / "MiniMix"))

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched on the device name.
BF16_PEAK_TFLOPS = [
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2), ("V100", None),
]

TINY_NCSNPP = ["--nf=16", "--ch_mult=[1,1,2,2]", "--num_res_blocks=1", "--attn_resolutions=[]"]
TINY_TCN = ["--N=16", "--B=8", "--H=16", "--X=2", "--R=1", "--emb_dim=8"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default, first GPU) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the path, not the speed")
    p.add_argument("--data", type=Path, help="a MiniMix (wav8k/min/{tr,cv,tt}); generated if absent")
    p.add_argument("--out", type=Path, help="report folder (default benchmarks/results/gpu_check_<card>)")
    p.add_argument("--work", type=Path, help="scratch folder (default <out>/work, deleted at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--steps", type=int, help="training steps per recipe (default 300; quick 4)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="torchrun processes (GPUs)")
    p.add_argument("--mixtures", type=int, help="test mixtures for the bf16 check (default 4; quick 2)")
    p.add_argument("--repeats", type=int, help="timed calls per mode (default 20; quick 2)")
    p.add_argument("--skip", nargs="*", default=[], choices=["recipes", "calls", "compile", "separate", "bf16"],
                   help="sections to leave out")
    p.add_argument("--recipe-timeout", type=float, default=240.0, help="seconds per recipe run")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- helpers
def log(msg):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def card_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def bf16_peak(name):
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats):
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls; and the last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


class Section:
    """Runs one part of the check; an exception is recorded in the report instead of ending the run."""

    def __init__(self, report, name):
        self.report, self.name = report, name

    def __enter__(self):
        log(f"--- {self.name}")
        self.start = time.perf_counter()
        return self

    def __exit__(self, kind, err, tb):
        seconds = round(time.perf_counter() - self.start, 1)
        self.report["seconds"][self.name] = seconds
        if err is not None:
            self.report["errors"].append(f"{self.name}: {kind.__name__}: {err}")
            traceback.print_exception(kind, err, tb)
            log(f"{self.name} FAILED after {seconds} s")
        else:
            log(f"{self.name} done in {seconds} s")
        return True


# --------------------------------------------------------------------------- 1. data
def ensure_data(args, work):
    if args.data is not None:
        if not (args.data / "wav8k" / "min" / "tt" / "mix").is_dir():
            raise SystemExit(f"error: --data {args.data} holds no wav8k/min/tt/mix; pass a MiniMix folder")
        return args.data
    from generate_minimix import generate_minimix

    out = work / "minimix"
    sizes = dict(n_train=8, n_valid=2, n_test=2, max_seconds=1.5) if args.quick else \
        dict(n_train=96, n_valid=4, n_test=8, max_seconds=3.0)
    generate_minimix(str(out), seed=0, jobs=min(4, os.cpu_count() or 1), **sizes)
    return out


def count_files(data, split):
    return len(glob.glob(str(data / "wav8k" / "min" / split / "mix" / "*.wav")))


# --------------------------------------------------------------------------- 2. recipes
def recipe_configs(args):
    """(label, yaml, overrides, batch size) of the recipe runs."""
    if args.quick:
        return [
            ("diffsep.yaml (paper NCSN++)", "diffsep.yaml", TINY_NCSNPP + [
                "--batch_size=2", "--grad_accumulation_factor=1", "--segment_seconds=0.5",
                "--separation_options={sampler: pc, num_steps: 2}"], 2),  # valid: !ref of it
            ("diffsep_tcn.yaml (Conv-TasNet, GPU size)", "diffsep_tcn.yaml", TINY_TCN + [
                "--batch_size=2", "--segment_seconds=0.5"], 2),
        ]
    return [
        ("diffsep.yaml (paper NCSN++)", "diffsep.yaml", [], 6),
        ("diffsep_tcn.yaml (Conv-TasNet, GPU size)", "diffsep_tcn.yaml", [], 4),
    ]


def run_in_group(cmd, env, timeout):
    """``subprocess.run`` in a process group of its own, the whole group killed on timeout
    (torchrun's workers would otherwise outlive it inside a collective)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise RuntimeError(f"timed out after {timeout:g} s (--recipe-timeout); last output: "
                           + " | ".join((out + err).strip().splitlines()[-3:])) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def last_test_line(train_log):
    if not train_log.is_file():
        return None
    lines = [ln.strip() for ln in train_log.read_text(encoding="utf-8").splitlines() if "test" in ln]
    return lines[-1] if lines else None


def run_recipe(args, device, data, work, label, hparams, overrides, batch_size):
    n_train = count_files(data, "tr")
    per_epoch = max(1, n_train // (batch_size * args.nproc_per_node))
    epochs = max(1, math.ceil(args.steps / per_epoch))
    name = Path(hparams).stem
    out = work / f"recipe_{name}"
    probe_out = work / f"probe_{name}.json"
    cuda = device.type == "cuda"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={args.nproc_per_node}", str(ROOT / "benchmarks" / "recipe_probe.py"),
        str(RECIPE / "train.py"), str(RECIPE / "hparams" / hparams),
        f"--data_folder={data}", f"--output_folder={out}", f"--number_of_epochs={epochs}",
        "--precision=bf16", "--eval_precision=bf16", "--n_valid_separations=1",
        "--test_metrics=[si_sdr,si_sdri]", "--ckpt_interval_minutes=0", "--noprogressbar",
        f"--distributed_backend={'nccl' if cuda else 'gloo'}",
        f"--device={'cuda' if cuda else 'cpu'}", *overrides,
    ]
    env = dict(os.environ, RECIPE_PROBE_OUT=str(probe_out), PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if args.quick:
        env["RECIPE_PROBE_WARMUP"] = "1"
    log(f"{label}: {epochs} epochs x {per_epoch} steps, batch {batch_size} per process")
    start = time.perf_counter()
    proc = run_in_group(cmd, env, args.recipe_timeout)
    seconds = time.perf_counter() - start
    (work / f"recipe_{name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    result = {"label": label, "yaml": hparams, "epochs": epochs, "batch_size_per_process": batch_size,
              "returncode": proc.returncode, "wall_seconds": round(seconds, 1),
              "aborted_at_exit": "terminate called" in proc.stdout + proc.stderr}
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        result["error_tail"] = tail
        raise RuntimeError(f"{hparams} exited {proc.returncode}: " + " | ".join(tail[-3:]))
    if probe_out.is_file():
        result.update(json.loads(probe_out.read_text(encoding="utf-8")))
    result["test"] = last_test_line(out / "train_log.txt")
    return result


# --------------------------------------------------------------------------- 3. network calls
def paper_network(quick, device):
    """The NCSN++ whose call is timed: the paper's (nf=128, 4 s at 8 kHz) or, ``quick``, a tiny one
    (nf=16, 1 s); eval mode, on ``device``. Returns ``(model, nf, seconds)``."""
    from speechbrain_diffsep.ncsnpp import ScoreModel

    nf, seconds = (16, 1.0) if quick else (128, 4.0)
    kwargs = dict(ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[]) if quick else {}
    torch.manual_seed(0)
    return ScoreModel(num_sources=2, nf=nf, **kwargs).eval().to(device), nf, seconds


def call_inputs(n, device, batch=1):
    """A fixed (x, t, y) of ``n`` samples at t = 0.5, the same mixture repeated ``batch`` times."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1, 1, n, generator=g)
    x = y / 2 + 0.3 * torch.randn(1, 2, n, generator=g)
    t = torch.full((1,), 0.5)
    return tuple(v.expand(batch, *v.shape[1:]).contiguous().to(device) for v in (x, t, y))


def gflop_per_call(model, x, t, y):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops() / 1e9


def network_calls(args, device, report):
    model, nf, seconds = paper_network(args.quick, device)
    x, t, y = call_inputs(int(seconds * 8000), device)
    gflop = gflop_per_call(model, x, t, y)
    peak = bf16_peak(card_name(device)) if device.type == "cuda" else None
    warmup, repeats = (1, args.repeats or 2) if args.quick else (3, args.repeats or 20)
    res = {"network": f"NCSN++ nf={nf}, {seconds:g} s at 8 kHz, batch 1, 2 sources",
           "gflop_per_call": round(gflop, 1), "bf16_peak_tflops": peak, "modes": {}}
    report["calls"] = res
    dev_type = device.type
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    modes = [("fp32", False, False, False), ("tf32", True, False, False), ("bf16", False, True, False)]
    if "compile" not in args.skip:
        cpu_quick = args.quick and device.type == "cpu"  # inductor's first CPU compile takes minutes
        modes.append(("compiled bf16 (dynamo, eager backend)" if cpu_quick else "compiled bf16", False, True, True))
    ref = None
    for mode, tf32, bf16, compiled in modes:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        backend = "eager" if args.quick and device.type == "cpu" else "inductor"
        net = torch.compile(model, backend=backend) if compiled else model
        try:
            def call():
                with torch.no_grad(), torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
                    return net(x, t, y)

            start = time.perf_counter()
            call()
            sync(device)
            first = time.perf_counter() - start
            sec, out = timed(call, device, warmup, repeats)
            out = out.float()
            if ref is None:
                ref = out
            rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
            entry = {"ms_per_call": round(1e3 * sec, 3), "first_call_s": round(first, 2),
                     "tflops": round(gflop / sec / 1e3, 2), "finite": bool(torch.isfinite(out).all()),
                     "rel_diff_vs_fp32": round(rel, 5)}
            if peak:
                entry["pct_of_bf16_peak"] = round(100 * gflop / sec / 1e3 / peak, 1)
            res["modes"][mode] = entry
            log(f"{mode}: {entry}")
        except Exception as err:  # e.g. no compiler toolchain: report and go on
            res["modes"][mode] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            log(f"{mode} failed: {err}")
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32


# --------------------------------------------------------------------------- 4./5. bundled models
class Autocast(torch.nn.Module):
    """Calls ``net`` under bf16 autocast and returns float32 (as the Brain's eval_precision=bf16)."""

    def __init__(self, net, device_type):
        super().__init__()
        self.net, self.device_type = net, device_type

    def forward(self, *a, **k):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.net(*a, **k).float()


def bundled_folders():
    return sorted(p.parent for p in (ROOT / "pretrained").glob("*/hyperparams.yaml"))


def load_bundled(folder, device, work):
    from speechbrain_diffsep.inference import DiffSepSeparation

    return DiffSepSeparation.from_hparams(source=str(folder), savedir=str(work / "models" / folder.name),
                                          run_opts={"device": str(device)})


def test_mixtures(data, n):
    """The first ``n`` test mixtures with their references: [(id, mix (1, T), refs (K, T))]."""
    import soundfile as sf

    out = []
    for path in sorted(glob.glob(str(data / "wav8k" / "min" / "tt" / "mix" / "*.wav")))[:n]:
        mix, _ = sf.read(path, dtype="float32")
        refs = [sf.read(path.replace(f"{os.sep}mix{os.sep}", f"{os.sep}s{k}{os.sep}"), dtype="float32")[0]
                for k in (1, 2)]
        out.append((Path(path).stem, torch.from_numpy(mix)[None], torch.from_numpy(__import__("numpy").stack(refs))))
    return out


def end_to_end(args, device, data, work, report):
    seconds = 1.0 if args.quick else 4.0
    n = int(seconds * 8000)
    mix = test_mixtures(data, 1)[0][1]
    mix = torch.nn.functional.pad(mix, (0, max(0, n - mix.shape[1])))[:, :n].to(device)
    warmup, repeats = (0, 1) if args.quick else (2, 5)
    rows = report["separate"] = []
    for folder in bundled_folders():
        model = load_bundled(folder, device, work)
        sec, est = timed(lambda: model.separate_batch(mix, seed=0), device, warmup, repeats)
        row = {"model": folder.name, "sampler": model._hparam("sampler"), "num_steps": model._hparam("num_steps"),
               "sampler_options": model._hparam("sampler_options"), "nfe": model.last_nfe,
               "seconds": round(sec, 4), "audio_seconds": seconds, "x_real_time": round(seconds / sec, 1),
               "finite": bool(torch.isfinite(est).all())}
        rows.append(row)
        log(f"{folder.name}: {row}")


def bf16_sampling(args, device, data, work, report):
    from speechbrain_diffsep.metrics import apply_permutation, best_permutation, si_sdr_improvement

    n = args.mixtures or (1 if args.quick else 4)
    mixtures = test_mixtures(data, n)
    rows = report["bf16"] = []
    for folder in bundled_folders():
        model = load_bundled(folder, device, work)
        net = model.mods.score_model
        scores = {}
        finite = True
        for mode in ("fp32", "bf16"):
            model.mods.score_model = Autocast(net, device.type) if mode == "bf16" else net
            vals = []
            for _, mix, refs in mixtures:
                est = model.separate_batch(mix.to(device), seed=0).transpose(1, 2).float().cpu()  # (1, K, T)
                finite &= bool(torch.isfinite(est).all())
                est = apply_permutation(est, best_permutation(est, refs[None]))
                imp = si_sdr_improvement(est, refs[None], mix[None])
                vals.append(float(imp.mean()))
            scores[mode] = statistics.mean(vals)
        model.mods.score_model = net
        diff = scores["bf16"] - scores["fp32"]
        row = {"model": folder.name, "mixtures": len(mixtures), "si_sdri_fp32": round(scores["fp32"], 2),
               "si_sdri_bf16": round(scores["bf16"], 2), "diff_db": round(diff, 2), "finite": finite,
               "within_0.3_db": abs(diff) <= 0.3}
        rows.append(row)
        log(f"{folder.name}: {row}")


# --------------------------------------------------------------------------- report
def fmt(v):
    return "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def write_markdown(report, path):
    lines = [f"# GPU check: {report['card']}", "",
             f"`{report['command']}` on {report['date']}: torch {report['torch']}, CUDA {report['cuda']}, "
             f"Python {report['python']}, {report['cpu_count']} CPU cores"
             + (" (quick mode: tiny sizes, not a speed measurement)" if report["quick"] else "") + ".", ""]
    if report["errors"]:
        lines += ["**Errors:**", ""] + [f"- {e}" for e in report["errors"]] + [""]
    recipes = report.get("recipes") or []
    if recipes:
        lines += ["## Recipes under torchrun, `--precision=bf16`", "",
                  "| recipe | processes | batch/process | steps (timed) | train examples/s | peak GPU memory (GiB) | wall s | exit | test |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in recipes:
            lines.append(f"| {r['label']} | {r.get('world_size', '')} | {r['batch_size_per_process']} | "
                         f"{r.get('steps', '')} ({r.get('timed_steps', '')}) | {fmt(r.get('examples_per_s'))} | "
                         f"{fmt(r.get('peak_gpu_memory_gib'))} | {r['wall_seconds']} | "
                         f"{r['returncode']}{' ABORT' if r['aborted_at_exit'] else ''} | {r.get('test') or ''} |")
        lines.append("")
    calls = report.get("calls")
    if calls:
        lines += [f"## One network call: {calls['network']}", "",
                  f"{calls['gflop_per_call']} GFLOP per call (torch.utils.flop_counter); card bf16 peak: "
                  f"{fmt(calls['bf16_peak_tflops'])} TFLOP/s.", "",
                  "| mode | ms per call | TFLOP/s | % of bf16 peak | first call s | rel. diff vs fp32 | finite |",
                  "|---|---|---|---|---|---|---|"]
        for mode, e in calls["modes"].items():
            if "error" in e:
                lines.append(f"| {mode} | failed: {e['error']} | | | | | |")
            else:
                lines.append(f"| {mode} | {e['ms_per_call']} | {e['tflops']} | {fmt(e.get('pct_of_bf16_peak'))} | "
                             f"{e['first_call_s']} | {e['rel_diff_vs_fp32']} | {e['finite']} |")
        lines.append("")
    if report.get("separate"):
        lines += ["## End to end: one mixture through `DiffSepSeparation`, default sampler", "",
                  "| model | sampler | network calls | seconds | audio s | x real time | finite |", "|---|---|---|---|---|---|---|"]
        for r in report["separate"]:
            lines.append(f"| {r['model']} | {r['sampler']} {r['num_steps']} {r['sampler_options'] or ''} | {r['nfe']} | "
                         f"{r['seconds']} | {r['audio_seconds']} | {r['x_real_time']} | {r['finite']} |")
        lines.append("")
    if report.get("bf16"):
        lines += ["## bf16 sampling against fp32 (same seed, network under autocast)", "",
                  "| model | mixtures | SI-SDRi fp32 | SI-SDRi bf16 | difference dB | within 0.3 dB | finite |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["bf16"]:
            lines.append(f"| {r['model']} | {r['mixtures']} | {r['si_sdri_fp32']} | {r['si_sdri_bf16']} | "
                         f"{r['diff_db']} | {r['within_0.3_db']} | {r['finite']} |")
        lines.append("")
    lines += ["Section times (s): " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()), ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA GPU; pass --device cpu --quick to check on CPU")
    if args.steps is None:
        args.steps = 4 if args.quick else 300
    card = card_name(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_").lower() or "device"
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_check_{slug}"
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    # the command as run, without this machine's paths (shipped reports carry none)
    command = "python benchmarks/gpu_check.py " + " ".join(
        re.sub(r"(^|=)/\S*", r"\1<path>", a) for a in (argv if argv is not None else sys.argv[1:]))
    report = {"card": card, "device": str(device), "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "command": command, "errors": [], "seconds": {}}
    start = time.perf_counter()
    data = None
    with Section(report, "data"):
        data = ensure_data(args, work)
    if data is not None and "recipes" not in args.skip:
        def one(config):
            label, hparams, overrides, batch = config
            with Section(report, f"recipe {hparams}"):
                return run_recipe(args, device, data, work, label, hparams, overrides, batch)
            return None  # the Section recorded the error

        configs = recipe_configs(args)
        # --quick on a CPU checks the path, not the speed: the recipe runs (subprocesses, one thread
        # each in CI) go side by side; anywhere else one at a time, so that their timings are clean
        side_by_side = len(configs) if args.quick and device.type == "cpu" else 1
        with ThreadPoolExecutor(side_by_side) as pool:
            report["recipes"] = [r for r in pool.map(one, configs) if r is not None]
    if "calls" not in args.skip:
        with Section(report, "network calls"):
            network_calls(args, device, report)
    if data is not None and "separate" not in args.skip:
        with Section(report, "end to end"):
            end_to_end(args, device, data, work, report)
    if data is not None and "bf16" not in args.skip:
        with Section(report, "bf16 sampling"):
            bf16_sampling(args, device, data, work, report)
    report["seconds"]["total"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_markdown(report, out / "gpu_check.md")
    if not args.keep_work and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    log(f"report: {out / 'gpu_check.md'} ({report['seconds']['total']} s, {len(report['errors'])} errors)")
    return report


if __name__ == "__main__":
    rep = main()
    sys.exit(1 if rep["errors"] else 0)
