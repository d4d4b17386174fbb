"""Command-line separation and enhancement with a DiffSep model folder.

::

    diffsep-separate mix1.wav mixes/ --model pretrained/diffsep-wsj0 --out separated/ --steps 30
    diffsep-enhance noisy/ --model pretrained/diffsep-vb --out enhanced/ --device cuda
    python -m speechbrain_diffsep.cli separate ...   # same as diffsep-separate
    python -m speechbrain_diffsep.cli enhance ...    # same as diffsep-enhance

Inputs are audio files or folders (their audio files, not recursive). ``diffsep-separate`` writes
``<out>/<name>_s1.wav ... <name>_sK.wav`` (each source peak-normalized, as
``DiffSepSeparation.separate_file``); ``diffsep-enhance`` writes ``<out>/<name>_enhanced.wav``.
Outputs are at the model's sample rate. A bad input file is reported on one line and skipped; the
exit status is 1 if anything failed (2 for a usage error), 0 otherwise. No tracebacks (``--debug``
shows them).
"""

import argparse
import sys
import warnings
from pathlib import Path

import soundfile
import torch

AUDIO_EXTENSIONS = {"." + ext.lower() for ext in soundfile.available_formats()} | {".ogg", ".mp3", ".opus"}


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` that reports usage errors on a single line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog, task):
    p = OneLineParser(
        prog=prog,
        description=(
            "Separate mixtures into sources" if task == "separate" else "Enhance noisy speech"
        ) + " with a DiffSep model folder (see python -m speechbrain_diffsep.export).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files and/or folders of audio files")
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (hyperparams.yaml + score_model.ckpt)")
    p.add_argument("--out", default=".", metavar="DIR", help="output folder (default: the current folder)")
    p.add_argument("--steps", type=int, help="number of sampler steps (default: the model's yaml)")
    p.add_argument("--sampler", help="sampler name: pc, em, ode, edm, ddim (DiffSep's SDE) or euler, heun, "
                   "midpoint (flow-matching models) (default: the model's yaml)")
    p.add_argument("--restart-t", type=float, metavar="T",
                   help="SDE samplers: restart at this diffusion time after one call at T (e.g. 0.5; "
                        "default: the model's yaml)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (SpeechBrain's run option; the first call compiles, "
                        "worth it for many or long files)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (implies --compile); reduce-overhead replays each call as one CUDA graph: "
                        "one NCSN++ call 23 -> 7.4 ms on an H200 (benchmarks/results/ncsnpp_call_speed_nvidia_h200)")
    p.add_argument("--chunk-seconds", type=float, help="process long files in chunks of this many seconds")
    p.add_argument("--overlap-seconds", type=float, help="overlap of consecutive chunks (default: the yaml's, 1 s)")
    p.add_argument("--seed", type=int, help="random seed (same output for the same input and seed)")
    p.add_argument(
        "--refine",
        metavar="DIR|self",
        help="refiner mode: start from the estimate of this SpeechBrain separation folder "
        "(SepformerSeparation layout, e.g. Conv-TasNet) or of a fast pass of the model ('self')",
    )
    p.add_argument("--t-start", type=float, help="diffusion time the refiner starts from (default 0.5)")
    if task == "separate":
        p.add_argument("--num-spks", type=int, help="check that the model separates this many sources")
    p.add_argument("--subtype", default="PCM_16", help="output sample format for soundfile (default PCM_16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def collect_inputs(inputs):
    """``(files, problems)``: audio files of the inputs (folders expanded, sorted) and one-line
    messages for inputs that do not exist or folders without audio."""
    files, problems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                problems.append(f"{item}: folder has no audio files ({', '.join(sorted(AUDIO_EXTENSIONS)[:4])}, ...)")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def _check_device(device):
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def _write(path, wav, rate, subtype, report):
    data = wav.detach().cpu().numpy()
    if subtype.upper().startswith("PCM") and abs(data).max(initial=0.0) > 1.0:
        report(f"warning: {path}: peak {abs(data).max():.2f} > 1 is clipped by {subtype}; use --subtype FLOAT")
    soundfile.write(str(path), data, rate, subtype=subtype)


def run(task, argv=None, prog=None):
    """Parse ``argv`` and process every input; returns the exit status."""
    prog = prog or ("diffsep-separate" if task == "separate" else "diffsep-enhance")
    try:
        args = build_parser(prog, task).parse_args(argv)
    except SystemExit as done:  # usage error (2) or --help (0): return the status instead of exiting
        return done.code
    from tqdm.auto import tqdm

    def report(message):
        tqdm.write(f"{prog}: {message}", file=sys.stderr)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        report(f"warning: {message}")

    failures = 0
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show_warning
        try:
            _check_device(args.device)
            if args.steps is not None and args.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {args.steps}")
            if args.subtype.upper() not in soundfile.available_subtypes("WAV"):
                raise ValueError(f"--subtype {args.subtype}: not a WAV subtype (e.g. PCM_16, PCM_24, FLOAT)")
            model = _load_model(task, args)
            out_dir = Path(args.out)
            if out_dir.exists() and not out_dir.is_dir():
                raise ValueError(f"--out {out_dir}: exists and is not a folder")
            out_dir.mkdir(parents=True, exist_ok=True)
        except Exception as err:
            if args.debug:
                raise
            report(f"error: {_message(err)}")
            return 1
        files, problems = collect_inputs(args.inputs)
        for problem in problems:
            report(f"error: {problem}")
        failures += len(problems)
        options = dict(num_steps=args.steps, sampler=args.sampler, seed=args.seed, restart_t=args.restart_t,
                       chunk_seconds=args.chunk_seconds, overlap_seconds=args.overlap_seconds)
        options = {k: v for k, v in options.items() if v is not None}
        used = {}
        for path in tqdm(files, desc=prog, unit="file", disable=True if args.quiet else None, file=sys.stderr):
            if path.stem in used:
                report(f"error: {path}: its outputs would overwrite those of {used[path.stem]}; rename one of them")
                failures += 1
                continue
            used[path.stem] = path
            try:
                _process(task, model, path, out_dir, options, args.subtype, report)
            except Exception as err:
                if args.debug:
                    raise
                msg = _message(err)
                report(f"error: {msg if str(path) in msg else f'{path}: {msg}'}")
                failures += 1
    return 1 if failures else 0


def _message(err):
    from .inference import _one_line

    if isinstance(err, (ValueError, OSError)):
        return _one_line(err)
    return f"{type(err).__name__}: {_one_line(err)}"


def _load_model(task, args):
    from .inference import DiffSepEnhancement, DiffSepSeparation

    from .inference import _load_separator

    run_opts = {"device": args.device, "compile": bool(args.compile or args.compile_mode)}
    if args.compile_mode:
        run_opts["compile_mode"] = args.compile_mode
    if task == "separate":
        model = DiffSepSeparation.from_hparams(source=args.model, run_opts=run_opts, num_spks=args.num_spks)
    else:
        model = DiffSepEnhancement.from_hparams(source=args.model, run_opts=run_opts)
    if args.refine:
        sep = "self" if args.refine == "self" else _load_separator(args.refine, args.device)
        model.set_initial_separator(sep, t_start=args.t_start)
    elif args.t_start is not None:
        model.hparams.t_start = args.t_start
    return model


def _process(task, model, path, out_dir, options, subtype, report):
    rate = int(model.hparams.sample_rate)
    if task == "separate":
        est = model.separate_file(str(path), **options)[0]  # (time, K)
        for k in range(est.shape[1]):
            _write(out_dir / f"{path.stem}_s{k + 1}.wav", est[:, k], rate, subtype, report)
    else:
        enhanced = model.enhance_file(str(path), **options)
        _write(out_dir / f"{path.stem}_enhanced.wav", enhanced, rate, subtype, report)


def separate_main(argv=None):
    """Console script ``diffsep-separate``."""
    return run("separate", argv)


def enhance_main(argv=None):
    """Console script ``diffsep-enhance``."""
    return run("enhance", argv)


def main(argv=None):
    """``python -m speechbrain_diffsep.cli {separate,enhance} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m speechbrain_diffsep.cli"
    if not argv or argv[0] not in ("separate", "enhance"):
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: {prog} {{separate,enhance}} INPUT... --model DIR [options]; {prog} separate --help for the options")
            return 0
        print(f"{prog}: error: the first argument must be 'separate' or 'enhance' (see --help)", file=sys.stderr)
        return 2
    return run(argv[0], argv[1:], prog=f"{prog} {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
