"""Train the study's full-size model briefly on a CPU and commit its routing trace as a stand-in
until the GPU study's trace exists: python scripts/lm_cpu_trace.py [--out results/traces]."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from routerlib.models.data import load_corpus
from routerlib.models.study import SIZES, Strategy, lm_config
from routerlib.models.traces import capture_trace
from routerlib.models.train import build_model, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/traces")
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    torch.set_num_threads(1)
    corpus = load_corpus()
    base, tcfg = SIZES["full"]
    base = dataclasses.replace(base, vocab_size=corpus.vocab_size)
    tcfg = dataclasses.replace(tcfg, steps=a.steps, batch_size=8, seq_len=128, warmup_steps=15,
                               eval_every=a.steps, eval_batches=2)
    for s in (Strategy("aux_1e-2", "", {"aux_loss_coef": 1e-2}), Strategy("none", "")):
        model = build_model(lm_config(base, s), tcfg.seed)
        res = train(model, corpus, tcfg, desc=s.name)
        label = (f"CPU-trained stand-in (not the GPU study): the full-size architecture trained "
                 f"{a.steps} steps of {tcfg.batch_size * tcfg.seq_len} tokens on a CPU, "
                 f"strategy {s.name}, validation loss {res.final_val_loss:.3f}")
        name = "lm_trace.npz" if s.name != "none" else "lm_trace_none.npz"
        path = capture_trace(model, corpus, seq_len=256, label=label, strategy=s.name,
                             val_loss=res.final_val_loss, steps=a.steps).save(f"{a.out}/{name}")
        print(path, label)


if __name__ == "__main__":
    main()
