"""End-to-end inference with the MoE language model: batched prefill, token-by-token decode with
the KV cache, sampling (greedy, temperature, top-p; seeded), the decode step in a CUDA graph.

Shape legend: B batch, S prompt length, N new tokens, M cache length (S + N), V vocabulary.

    gen = Generator(model, batch_size=B, max_seq_len=M)        # graph=None: a graph on CUDA
    out = gen.generate(prompt, max_new_tokens=N, sampling=Sampling(temperature=0.8, top_p=0.9))
    out.tokens  # [B, S + N] long

The decode step (one token per sequence through every layer, keys/values written into the cache
at its position) has static shapes and, on the triton backend, no host sync: it is captured once
in a CUDA graph whose input buffers (token [B, 1], position [1]) are filled before each replay.
Sampling runs after the graph (a few small kernels, a seeded torch.Generator). Without CUDA, or
when the step cannot be captured (the torch reference routing syncs with the host), the step
runs eagerly and `Generator.graph_error` says why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from routerlib.models.lm import KVCache, MoETransformer


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax). Else softmax(logits / temperature), restricted to the
    nucleus (the smallest set of most likely tokens whose probability reaches top_p), sampled
    with a torch.Generator seeded by seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"Sampling.temperature={self.temperature!r}: must be finite, >= 0 "
                             "(0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampling.top_p={self.top_p!r}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] logits -> [B, V] fp32 probabilities, zero outside the top-p nucleus, renormalised.
    A token is kept when the probability of the tokens strictly more likely (sorted before it)
    is < top_p, so the most likely token is always kept; ties sort by token id."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [B, V]
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ahead
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits of the last position -> [B] long next tokens."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = nucleus_probs(logits, sampling.temperature, sampling.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, S + N] long: the prompt then the generated tokens
    prefill_s: float  # wall time of the prefill (synchronised)
    step_s: list[float] = field(default_factory=list)  # wall time of each decode step + sample


class Generator:
    """Batched prefill + cached decode for one batch size and cache length.

    graph: capture the decode step in a CUDA graph (None: when the model is on CUDA). The cache
    and the graph are built once and reused by every generate() call with this batch size."""

    def __init__(self, model: MoETransformer, batch_size: int, max_seq_len: int,
                 graph: bool | None = None):
        if batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and max_seq_len="
                             f"{max_seq_len} >= 2")
        self.model = model.eval()
        p = next(model.parameters())
        self.device = p.device
        self.cache: KVCache = model.new_cache(batch_size, max_seq_len)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.want_graph = self.device.type == "cuda" if graph is None else graph
        if self.want_graph and self.device.type != "cuda":
            raise ValueError("graph=True needs the model on a CUDA device")
        self._tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # [B, 1]
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)  # [1]
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None  # [B, V]: the graph's output buffer
        self.graph_error: str | None = None

    @property
    def uses_graph(self) -> bool:
        return self._graph is not None

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt [B, S] long -> logits [B, V] of the last position; writes S keys/values."""
        B, S = prompt.shape
        if B != self.batch_size:
            raise ValueError(f"prompt holds {B} sequences, the generator {self.batch_size}")
        if S < 1 or S >= self.max_seq_len:
            raise ValueError(f"prompt length {S} must be in [1, max_seq_len={self.max_seq_len})")
        pos = torch.arange(S, device=self.device)
        return self.model(prompt.to(self.device), cache=self.cache, input_pos=pos).logits[:, -1]

    def _step_eager(self) -> torch.Tensor:
        return self.model(self._tok, cache=self.cache, input_pos=self._pos).logits[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream (compiles and autotunes the kernels), then capture one
        decode step. The warm-up writes the current token's keys/values at its own position,
        as the step itself does. A step that syncs with the host fails inside the capture: the
        CUDA state is then repaired and the generator stays eager, with graph_error saying why."""
        from routerlib.bench.timing import _recover_after_failed_capture

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step_eager()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                self._logits = self._step_eager()
            self._graph = g
        except Exception as e:  # RuntimeError or torch.AcceleratorError
            del g
            self._graph, self._logits = None, None
            state = "" if _recover_after_failed_capture() else " (CUDA state broken)"
            self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}{state}"

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens [B] long at absolute position pos -> logits [B, V] of the next token."""
        if not 0 <= pos < self.max_seq_len:
            raise ValueError(f"position {pos} is outside the cache of {self.max_seq_len}")
        self._tok.copy_(tokens.view(-1, 1))
        self._pos.fill_(pos)
        if self.want_graph and self._graph is None and self.graph_error is None:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
            return self._logits
        return self._step_eager()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int,
                 sampling: Sampling = Sampling()) -> GenerationOutput:
        """prompt [B, S] long (equal lengths; no padding) -> GenerationOutput with [B, S + N]."""
        B, S = prompt.shape
        if max_new_tokens < 1 or S + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt length {S} + max_new_tokens={max_new_tokens} must fit the "
                             f"cache of {self.max_seq_len} (and max_new_tokens >= 1)")
        g = None
        if not sampling.greedy:
            g = torch.Generator(device=self.device).manual_seed(sampling.seed)
        self._sync()
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        nxt = sample_next(logits, sampling, g)  # [B]
        self._sync()
        out = GenerationOutput(tokens=torch.empty(0), prefill_s=time.perf_counter() - t0)
        new = [nxt]
        for i in range(1, max_new_tokens):
            t0 = time.perf_counter()
            logits = self.decode_step(nxt, S + i - 1)
            nxt = sample_next(logits, sampling, g)
            self._sync()
            out.step_s.append(time.perf_counter() - t0)
            new.append(nxt)
        out.tokens = torch.cat([prompt.to(self.device), torch.stack(new, dim=1)], dim=1)
        return out


def generate(model: MoETransformer, prompt: torch.Tensor, max_new_tokens: int,
             sampling: Sampling = Sampling(), graph: bool | None = None) -> torch.Tensor:
    """One-shot generation: prompt [B, S] long -> [B, S + max_new_tokens] long."""
    gen = Generator(model, prompt.shape[0], prompt.shape[1] + max_new_tokens, graph=graph)
    return gen.generate(prompt, max_new_tokens, sampling).tokens
