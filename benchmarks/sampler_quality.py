"""SI-SDR against the number of network calls (NFE) for every sampler.

Two problems:

(a) ``--problem oracle``: Gaussian sources with an exact score (the posterior of each sample is
    known in closed form), so the samplers are compared without a network: SI-SDR of the sampled
    sources against the true sources, and the error of the posterior mean.
(b) ``--problem model --model DIR --data CSV``: a trained model folder (``from_hparams`` layout) on
    held-out mixtures of a SpeechBrain CSV (``mix_wav, s1_wav, s2_wav``), SI-SDR / PESQ / ESTOI.

Writes a markdown table and a PNG (SI-SDR vs NFE, one line per sampler) into ``--out``.

    python benchmarks/sampler_quality.py --problem oracle --out results/samplers_oracle
    python benchmarks/sampler_quality.py --problem model --model pretrained/diffsep-minimix \\
        --data results/minimix/save/test.csv --n-utts 10 --out results/samplers_minimix
"""

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from speechbrain_diffsep.sampling import SAMPLERS  # noqa: E402
from speechbrain_diffsep.sde import MixingSDE  # noqa: E402

GRID = {
    "pc": [2, 3, 5, 10, 15, 30],
    "em": [3, 5, 10, 20, 30, 60],
    "ode": [2, 3, 4, 6, 11, 16, 31],
    "edm": [2, 3, 4, 6, 11, 16, 31],
}


def si_sdr(est, ref):
    ref = ref - ref.mean(-1, keepdim=True)
    est = est - est.mean(-1, keepdim=True)
    a = (est * ref).sum(-1, keepdim=True) / (ref * ref).sum(-1, keepdim=True).clamp(min=1e-12)
    e_t = a * ref
    return 10 * torch.log10((e_t**2).sum(-1) / ((est - e_t) ** 2).sum(-1).clamp(min=1e-12))


class GaussianProblem:
    """Sources s_k ~ N(0, c_k) i.i.d. over samples; exact score of p_t(x | y) for the SDE."""

    def __init__(self, sde, c=(1.0, 0.5)):
        self.sde = sde
        K = len(c)
        C = torch.diag(torch.tensor(c, dtype=torch.float64))
        one = torch.ones(K, 1, dtype=torch.float64)
        self.gain = (C @ one / (one.T @ C @ one)).squeeze(1)
        self.C_y = C - C @ one @ one.T @ C / (one.T @ C @ one)
        self.P = torch.full((K, K), 1.0 / K, dtype=torch.float64)
        self.Pb = torch.eye(K, dtype=torch.float64) - self.P
        self.c = torch.tensor(c, dtype=torch.float64)

    def score(self, x, t, y):
        t0 = float(t[0])
        M = self.P + math.exp(-self.sde.gamma * t0) * self.Pb
        lam1, lam2 = self.sde.eigenvalues(torch.tensor([t0], dtype=torch.float64))
        S = M @ self.C_y @ M.T + float(lam1) * self.P + float(lam2) * self.Pb
        mean = torch.einsum("ij,bjn->bin", M, self.gain[None, :, None] * y)
        return -torch.einsum("ij,bjn->bin", torch.linalg.inv(S), x - mean)

    def draw(self, batch, n, g):
        s = torch.randn(batch, len(self.c), n, generator=g, dtype=torch.float64) * self.c.sqrt()[None, :, None]
        return s, s.sum(1, keepdim=True)


def run_oracle(args):
    """For one fixed mixture, ``--batch`` draws per sampler: distance of the draws to the exact posterior.

    Reports SI-SDR of the draws against the true sources (what a user sees; for i.i.d. Gaussian
    sources even exact posterior samples score low), the RMS bias of the draws' mean against the
    exact posterior mean, the ratio of the draws' std to the posterior std, and the 2-Wasserstein
    distance per sample between the draws and the exact posterior (0 for a perfect sampler).
    """
    sde = MixingSDE(num_sources=2)
    prob = GaussianProblem(sde)
    g = torch.Generator().manual_seed(0)
    s1, y1 = prob.draw(1, args.samples, g)
    s, y = s1.expand(args.batch, -1, -1), y1.expand(args.batch, -1, -1).contiguous()
    post = prob.gain[None, :, None] * y1
    post_std = prob.C_y.diagonal().sqrt()[None, :, None]
    rows = []
    for name, steps_list in GRID.items():
        for steps in steps_list:
            est, nfe = SAMPLERS[name](prob.score, sde, y, num_steps=steps, generator=torch.Generator().manual_seed(1))
            m, sd = est.mean(0, keepdim=True), est.std(0, keepdim=True)
            w2 = ((m - post) ** 2 + (sd - post_std) ** 2).mean().sqrt()
            rows.append(
                dict(
                    sampler=name,
                    steps=steps,
                    nfe=nfe,
                    si_sdr=float(si_sdr(est, s).mean()),
                    bias_rms=float((m - post).pow(2).mean().sqrt()),
                    std_ratio=float((sd / post_std).mean()),
                    w2=float(w2),
                )
            )
            r = rows[-1]
            print(f"{name:4s} steps={steps:3d} nfe={nfe:3d} SI-SDR={r['si_sdr']:6.2f} dB  W2={r['w2']:.3f}  std ratio={r['std_ratio']:.2f}")
    print(f"posterior mean (MMSE) SI-SDR = {float(si_sdr(post, s1).mean()):.2f} dB (a point estimate, not a sample)")
    return rows


def _score_model_runs(model, utts, run, label, args):
    """Average SI-SDR (and PESQ/ESTOI with --pesq) of ``run(mix [1, T], seed) -> [1, T, K]``."""
    import soundfile as sf

    from speechbrain_diffsep.metrics import apply_permutation, best_permutation, dnsmos, estoi_score, pesq_score

    scores, pesqs, estois, ovrls, nfes, t0 = [], [], [], [], [], time.time()
    for i, u in enumerate(utts):
        mix, fs = sf.read(u["mix_wav"], dtype="float32")
        refs = torch.stack([torch.from_numpy(sf.read(u[f"s{k + 1}_wav"], dtype="float32")[0]) for k in range(2)])
        mix_t = torch.from_numpy(mix)[None]
        if model is not None:
            model.last_nfe = 0
        est = run(mix_t, i)[0].T[None]  # (1, K, T)
        nfes.append(model.last_nfe if model is not None else 0)
        est = apply_permutation(est, best_permutation(est, refs[None]))[0]
        scores.append(float((si_sdr(est, refs) - si_sdr(mix_t.expand(2, -1), refs)).mean()))
        if args.pesq:
            pesqs.append(float(pesq_score(est, refs, fs).mean()))
            estois.append(float(estoi_score(est, refs, fs).mean()))
        if args.dnsmos:
            ovrls.append(float(dnsmos(est, fs)["ovrl"].mean()))
    row = dict(method=label, nfe=sum(nfes) / len(nfes), si_sdri=sum(scores) / len(scores), seconds=time.time() - t0)
    if pesqs:
        row.update(pesq=sum(pesqs) / len(pesqs), estoi=sum(estois) / len(estois))
    if ovrls:
        row.update(ovrl=sum(ovrls) / len(ovrls))
    print(row, flush=True)
    return row


NFE_GRID = (1, 2, 3, 5, 10, 20, 60)


def nfe_of(name, steps, restart=False):
    """Network calls of a sampler run (the formulas the samplers' docstrings state)."""
    n = {
        "pc": 2 * steps, "em": steps, "ode": 2 * (max(steps, 2) - 1) + 1, "edm": 2 * (max(steps, 2) - 1) + 1,
        "ddim": steps, "euler": steps, "heun": 2 * steps - 1, "midpoint": 2 * steps,
    }[name]
    return n + (1 if restart else 0)


def steps_for(name, target, restart=False):
    """The step count whose NFE is closest to ``target`` (ties: fewer calls)."""
    lo = 2 if name in ("ode", "edm") else 1
    return min(range(lo, 200), key=lambda n: (abs(nfe_of(name, n, restart) - target), nfe_of(name, n, restart)))


def parse_spec(spec):
    """``NAME[@key=value,...]`` -> ``(label, name, options)``, e.g. ``ode@restart_t=0.5``."""
    import yaml

    name, _, rest = spec.partition("@")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        opts[key] = yaml.safe_load(value)
    if name not in SAMPLERS:
        raise SystemExit(f"unknown sampler {name!r} in --samplers; choose from {sorted(SAMPLERS)}")
    return spec, name, opts


def run_model(args):
    """SI-SDRi (PESQ, ESTOI, OVRL) vs NFE of the given samplers on a trained model folder.

    ``--samplers`` takes specs ``NAME[@opt=value,...]`` (default: the samplers that fit the model:
    the flow samplers for a flow-matching model, else ode, ddim, edm and pc, with and without
    ``restart_t=0.5``); every spec runs at the step count closest to each ``--nfe`` target
    (duplicates dropped), plus the paper's PC-30 (60 NFE) for a DiffSep model. Optional refiner rows.
    """
    import csv

    from speechbrain_diffsep.flow import FLOW_SAMPLERS, SeparationFlow
    from speechbrain_diffsep.inference import DiffSepSeparation, _load_separator

    model = DiffSepSeparation.from_hparams(source=args.model, savedir=args.model)
    model.set_initial_separator(None)  # sampler rows: DiffSep alone, from the prior (even for a refiner folder)
    with open(args.data) as f:
        utts = list(csv.DictReader(f))[: args.n_utts]
    is_flow = isinstance(model.hparams.sde, SeparationFlow)
    if args.samplers:
        specs = [parse_spec(x) for x in args.samplers]
    elif is_flow:
        specs = [parse_spec(x) for x in FLOW_SAMPLERS]
    else:
        specs = [parse_spec(x) for x in ("ode", "ode@restart_t=0.5", "ddim", "ddim@restart_t=0.5", "edm@restart_t=0.5",
                                         "pc", "pc@restart_t=0.5")]
    rows = []
    for label, name, opts in specs:
        restart = opts.get("restart_t") is not None
        targets = [] if args.steps else args.nfe  # --steps replaces the NFE targets
        plan = dict.fromkeys([steps_for(name, n, restart) for n in targets] + list(args.steps or []))
        for steps in plan:
            if args.max_nfe and nfe_of(name, steps, restart) > args.max_nfe + 1:
                continue

            def run(mix, seed, name=name, steps=steps, opts=opts):
                return model.separate_batch(mix, sampler=name, num_steps=steps, seed=seed, **opts)

            rows.append(dict(sampler=label, steps=steps, **_score_model_runs(model, utts, run, f"{label}-{steps}", args)))
            if args.consistency:
                def run_c(mix, seed, name=name, steps=steps, opts=opts):
                    return model.separate_batch(mix, sampler=name, num_steps=steps, seed=seed, consistency=True, **opts)

                rows.append(dict(sampler=label + "+mc", steps=steps, **_score_model_runs(model, utts, run_c, f"{label}-{steps}+mc", args)))
    if args.init_model:
        sep = _load_separator(args.init_model)
        rows.append(dict(sampler="init-only", steps=0, **_score_model_runs(None, utts, lambda m, s: sep.separate_batch(m), "initial separator alone", args)))
        for t_start in args.t_starts:
            model.set_initial_separator(sep, t_start=t_start)
            for steps in (args.steps or (2, 3, 5)):
                def run_r(mix, seed, steps=steps):
                    return model.separate_batch(mix, sampler=args.refine_sampler, num_steps=steps, seed=seed)

                rows.append(dict(sampler=f"refine@{t_start}", steps=steps, **_score_model_runs(model, utts, run_r, f"refine t={t_start} {steps}", args)))
        model.set_initial_separator(None)
    return rows


def summary(rows, key="si_sdri", tol_db=0.5):
    """Per sampler: best score, the score at 1-2 NFE (its fewest), the largest drop from the best to any
    later (more-NFE) setting, and whether more calls ever cost more than ``tol_db``."""
    out = []
    for name in dict.fromkeys(r["sampler"] for r in rows):
        rs = sorted((r for r in rows if r["sampler"] == name and key in r), key=lambda r: r["nfe"])
        if not rs:
            continue
        vals = [r[key] for r in rs]
        drop = max((max(vals[: i + 1]) - v for i, v in enumerate(vals)), default=0.0)
        best = max(rs, key=lambda r: r[key])
        out.append(dict(sampler=name, fewest_nfe=rs[0]["nfe"], at_fewest=vals[0], best=best[key], best_nfe=best["nfe"],
                        max_drop_with_more_nfe=drop, never_degrades=drop <= tol_db))
    return out


def first_within(rows, reference=("pc", 30), tol_db=0.2, key="si_sdri"):
    """Per sampler, the fewest NFE whose score is within ``tol_db`` of the reference row (PC-30, 60 NFE).

    Returns ``(reference value or None, {sampler: nfe or None})``.
    """
    ref = [r for r in rows if (r["sampler"], r["steps"]) == reference]
    if not ref or key not in ref[0]:
        return None, {}
    target = ref[0][key] - tol_db
    out = {}
    for name in dict.fromkeys(r["sampler"] for r in rows):
        ok = [r["nfe"] for r in rows if r["sampler"] == name and r[key] >= target]
        out[name] = min(ok) if ok else None
    return ref[0][key], out


def write_outputs(rows, out, title):
    os.makedirs(out, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out, "sampler_quality.md"), "w") as f:
        f.write(f"# {title}\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |\n")
        summ = summary(rows)
        if summ and "si_sdri" in rows[0]:
            f.write("\nPer sampler (SI-SDRi, dB): best setting, and the largest loss when adding calls "
                    "(from the best so far to any setting with more NFE):\n\n"
                    "| sampler | fewest NFE | SI-SDRi there | best | at NFE | max drop with more NFE | never > 0.5 dB worse |\n"
                    "|---|---|---|---|---|---|---|\n")
            for r in summ:
                f.write(f"| {r['sampler']} | {r['fewest_nfe']:g} | {r['at_fewest']:.2f} | {r['best']:.2f} | "
                        f"{r['best_nfe']:g} | {r['max_drop_with_more_nfe']:.2f} | {'yes' if r['never_degrades'] else 'no'} |\n")
        ref, first = first_within(rows)
        if ref is not None:
            f.write(f"\nFewest network calls within 0.2 dB of PC-30 (60 NFE, SI-SDRi {ref:.2f} dB):\n\n")
            for name, nfe in first.items():
                f.write(f"- {name}: {('%g NFE' % nfe) if nfe is not None else 'not reached in this grid'}\n")
            print(f"within 0.2 dB of PC-60 ({ref:.2f} dB): {first}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plt.figure(figsize=(6, 4))
    ykey = "si_sdr" if "si_sdr" in rows[0] else "si_sdri"
    for name in dict.fromkeys(r["sampler"] for r in rows):
        rs = [r for r in rows if r["sampler"] == name]
        plt.plot([max(r["nfe"], 0.8) for r in rs], [r[ykey] for r in rs], marker="o", label=name)
    plt.xscale("log")
    ax = plt.gca()
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([1, 2, 3, 5, 10, 20, 30, 60])
    plt.xlabel("network calls (NFE)")
    plt.ylabel("SI-SDR (dB)" if ykey == "si_sdr" else "SI-SDRi (dB)")
    plt.title(title)
    plt.grid(alpha=0.3)
    plt.legend()
    plt.tight_layout()
    plt.savefig(os.path.join(out, "sampler_quality.png"), dpi=120)
    print(f"wrote {out}/sampler_quality.md and .png")


def read_table(path):
    """The rows of a ``sampler_quality.md`` written by this script (numbers as floats)."""
    lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line.startswith("|")]
    keys = [k.strip() for k in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(keys) or cells[0] == "sampler" or set(cells[0]) <= {"-"}:
            break  # the next table (the summary) starts
        row = {}
        for k, c in zip(keys, cells):
            try:
                row[k] = float(c)
            except ValueError:
                row[k] = c
        rows.append(row)
    return rows


def merge(specs, out):
    """``LABEL=DIR`` of several model runs -> one table (SI-SDRi, PESQ, ESTOI, OVRL per NFE) and one PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for spec in specs:
        label, _, folder = spec.partition("=")
        for r in read_table(os.path.join(folder, "sampler_quality.md")):
            rows.append(dict(r, model=label, sampler=f"{label}: {r['sampler']}"))
    os.makedirs(out, exist_ok=True)
    keys = ["model", "sampler", "steps", "nfe", "si_sdri", "pesq", "estoi", "ovrl"]
    with open(os.path.join(out, "sampler_quality.md"), "w") as f:
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) and k in ("steps", "nfe")
                                      else f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                      for k in keys) + " |\n")
        f.write("\n| sampler | fewest NFE | SI-SDRi there | best | at NFE | max drop with more NFE | never > 0.5 dB worse |\n"
                "|---|---|---|---|---|---|---|\n")
        for r in summary(rows):
            f.write(f"| {r['sampler']} | {r['fewest_nfe']:g} | {r['at_fewest']:.2f} | {r['best']:.2f} | "
                    f"{r['best_nfe']:g} | {r['max_drop_with_more_nfe']:.2f} | {'yes' if r['never_degrades'] else 'no'} |\n")
    metrics = [k for k in ("si_sdri", "pesq", "estoi", "ovrl") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4), squeeze=False)
    axes = axes[0]
    for ax, key in zip(axes, metrics):
        for name in dict.fromkeys(r["sampler"] for r in rows):
            rs = sorted((r for r in rows if r["sampler"] == name and key in r), key=lambda r: r["nfe"])
            ax.plot([max(r["nfe"], 0.8) for r in rs], [r[key] for r in rs], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 3, 5, 10, 20, 60])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("network calls (NFE)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sampler_quality.png"), dpi=110)
    print(open(os.path.join(out, "sampler_quality.md")).read())
    print(f"wrote {out}/sampler_quality.md and .png")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", choices=["oracle", "model"], default="oracle")
    p.add_argument("--out", default="results/sampler_quality")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--n-utts", type=int, default=10)
    p.add_argument("--pesq", action="store_true", help="also PESQ and ESTOI (model mode)")
    p.add_argument("--dnsmos", action="store_true", help="also DNSMOS OVRL (model mode; slow)")
    p.add_argument("--samplers", nargs="*", help="sampler specs NAME[@opt=value,...] (model mode), e.g. ode@restart_t=0.5")
    p.add_argument("--nfe", type=int, nargs="*", default=list(NFE_GRID), help="NFE targets (model mode)")
    p.add_argument("--steps", type=int, nargs="*", help="step counts to try instead of the NFE targets (model mode)")
    p.add_argument("--max-nfe", type=int, help="skip step counts above about this many network calls")
    p.add_argument("--consistency", action="store_true", help="also rows with mixture consistency")
    p.add_argument("--init-model", help="SepformerSeparation folder (e.g. Conv-TasNet) for refiner rows")
    p.add_argument("--t-starts", type=float, nargs="*", default=[0.2, 0.4, 0.6])
    p.add_argument("--refine-sampler", default="ode")
    p.add_argument("--merge", nargs="+", metavar="LABEL=DIR",
                   help="only combine the tables of several --problem model runs into one table and PNG in --out")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    torch.set_num_threads(2)
    if args.problem == "oracle":
        rows = run_oracle(args)
        write_outputs(rows, args.out, "Oracle Gaussian score: SI-SDR vs NFE")
    else:
        if not (args.model and args.data):
            p.error("--problem model needs --model DIR and --data CSV")
        rows = run_model(args)
        write_outputs(rows, args.out, f"{os.path.basename(args.model.rstrip('/'))}: SI-SDR vs NFE")


if __name__ == "__main__":
    main()
