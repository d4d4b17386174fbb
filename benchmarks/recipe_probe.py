#!/usr/bin/env python3
"""Run a separation recipe's ``train.py`` with a throughput probe around its training steps.

Used by ``benchmarks/gpu_check.py`` (under ``torchrun``); nothing in the package depends on it.
The probe wraps the Brain's ``fit_batch``: after ``--warmup`` steps (CUDA kernels selected,
caches warm) it times every step to its end (``torch.cuda.synchronize``; SpeechBrain already
syncs each step when it averages the loss, so this adds little) and counts the examples. At the
end the main process writes JSON to ``$RECIPE_PROBE_OUT``: steps, examples, seconds, examples per
second (per rank and times the world size), and the peak GPU memory of training.

    RECIPE_PROBE_OUT=probe.json torchrun --nproc_per_node=1 benchmarks/recipe_probe.py \\
        recipes/WSJ0Mix/separation/train.py hparams/diffsep.yaml --data_folder=... --precision=bf16
"""

import json
import os
import runpy
import sys
import time

import torch

WARMUP = int(os.environ.get("RECIPE_PROBE_WARMUP", "10"))


class Probe:
    """Counts and times the training steps of one Brain."""

    def __init__(self, brain):
        self.brain = brain
        self.inner = brain.fit_batch
        self.steps = 0
        self.timed_steps = 0
        self.examples = 0
        self.seconds = 0.0
        self.cuda = str(brain.device).startswith("cuda")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(brain.device)
        brain.fit_batch = self

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.brain.device)

    def __call__(self, batch):
        timed = self.steps >= WARMUP
        if timed:
            self._sync()
            start = time.perf_counter()
        out = self.inner(batch)
        if timed:
            self._sync()
            self.seconds += time.perf_counter() - start
            self.timed_steps += 1
            self.examples += int(batch.mix_sig.data.shape[0])
        self.steps += 1
        return out

    def report(self):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_rank = self.examples / self.seconds if self.seconds else float("nan")
        peak = torch.cuda.max_memory_allocated(self.brain.device) / 2**30 if self.cuda else None
        return {
            "steps": self.steps,
            "timed_steps": self.timed_steps,
            "timed_examples_per_rank": self.examples,
            "timed_seconds": round(self.seconds, 3),
            "examples_per_s_per_rank": round(per_rank, 2),
            "world_size": world,
            "examples_per_s": round(per_rank * world, 2),
            "peak_gpu_memory_gib": None if peak is None else round(peak, 2),
            "device": str(self.brain.device),
        }


def main(argv):
    if len(argv) < 2:
        sys.exit("usage: recipe_probe.py TRAIN_PY HPARAMS.yaml [--key=value ...]")
    train_py, args = os.path.abspath(argv[0]), argv[1:]
    from speechbrain_diffsep import recipe

    probes = []
    build = recipe.build_brain

    def build_probed(hparams, run_opts):
        brain = build(hparams, run_opts)
        probes.append(Probe(brain))
        return brain

    recipe.build_brain = build_probed  # run_recipe looks the builder up in its module
    sys.argv = [train_py, *args]
    sys.path.insert(0, os.path.dirname(train_py))
    runpy.run_path(train_py, run_name="__main__")
    out = os.environ.get("RECIPE_PROBE_OUT")
    if out and probes and int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(probes[0].report(), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
