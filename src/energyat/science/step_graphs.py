"""CUDA graphs of the training step: its forward and backward (attack, losses, DER, gradients) captured once per
kind of step and replayed, so that a step costs a few launches instead of thousands.

Why: at the paper's batch of 128 a PGD-10 step of PreActResNet-18 launches ~3,100 kernels; on an H200, issuing
them took 69 ms while the kernels ran 23 ms (metrics/gpu_profile.json): the step was bound by launches, not by
arithmetic, and bf16 gained nothing over fp32.

How: a graph replays the captured kernels on the memory they were recorded with. So the step's inputs are copied
into static buffers, the gradients accumulate into `.grad` tensors allocated once (zeroed inside the graph), and
the optimiser step (its learning rate changes every step) stays outside. Whatever changes the recorded work makes
another kind of step: the flags the step branches on (DER on, diagnostics) key the graphs, and a batch of another
size (an epoch's last) runs eagerly. Each kind first runs `warmup` eager steps on a side stream (cuDNN's algorithm
search and lazy initialisation must not happen inside a capture), then is captured. A step's random draws are
made before it, into its inputs, so replays use fresh noise. Replays train bit-identically to eager steps
(tests/test_step_graphs.py on CUDA; the GPU check's `graphs.*` keys).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import UserError

StepFn = Callable[..., dict]  # (*inputs, *key) -> the step's outputs; runs forward and backward


class StepGraphs:
    """Run `fn(*inputs, *key)` (forward + backward of one training step) through CUDA graphs.

    `inputs`: the step's tensors (None allowed, e.g. no start noise), `key`: the hashable arguments the step
    branches on. `fn` must not synchronise with the host and must leave the gradients of `params` in their
    `.grad` tensors, and must compute the same eagerly as captured (no autocast cast cache: train.loss_backward).
    Returns `fn`'s outputs: for a replayed step, the graph's static outputs, overwritten by the next replay of
    the same kind (read or copy them before that).
    """

    def __init__(self, fn: StepFn, params: list[nn.Parameter], device: torch.device, batch: int, warmup: int = 2):
        self.fn, self.device, self.batch, self.warmup = fn, device, batch, warmup
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        self.side = torch.cuda.Stream(device)
        self.graphs: dict[tuple, tuple[tuple, torch.cuda.CUDAGraph, dict]] = {}
        self.seen: Counter = Counter()

    def _step(self, inputs: tuple, key: tuple) -> dict:
        torch._foreach_zero_(self.grads)
        return self.fn(*inputs, *key)

    def _eager(self, inputs: tuple, key: tuple) -> dict:
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            out = self._step(inputs, key)
        main.wait_stream(self.side)
        return out

    def _capture(self, inputs: tuple, key: tuple) -> tuple[tuple, torch.cuda.CUDAGraph, dict]:
        static = tuple(None if t is None else t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph):  # records the kernels; nothing runs until a replay
            out = self._step(static, key)
        return static, graph, out

    def __call__(self, inputs: tuple[Tensor | None, ...], key: tuple) -> dict:
        if any(p.grad is not g for p, g in zip(self.params, self.grads)):
            # a graph writes into the .grad tensors it was captured with; new ones would silently stay zero
            raise RuntimeError("StepGraphs: a parameter's .grad was replaced (zero_grad(set_to_none=True)?); "
                               "the captured graphs would no longer update it")
        if inputs[0].shape[0] != self.batch:
            return self._eager(inputs, key)
        entry = self.graphs.get(key)
        if entry is None:
            if self.seen[key] < self.warmup:
                self.seen[key] += 1
                return self._eager(inputs, key)
            try:
                entry = self.graphs[key] = self._capture(inputs, key)
            except RuntimeError as exc:  # e.g. an op that synchronises with the host, new in some method
                raise UserError(f"capturing the training step in a CUDA graph failed ({str(exc).splitlines()[0]}); "
                                "set cuda_graphs: false to train eagerly") from exc
        static, graph, out = entry
        for buffer, t in zip(static, inputs):
            if buffer is not None:
                buffer.copy_(t)
        graph.replay()
        return out
