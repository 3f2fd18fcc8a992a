"""CUDA graphs of the training step (step_graphs.py): when a step is warmed up, captured, replayed or run eagerly
(CPU, with torch.cuda's graph API replaced by recorders), and on a CUDA machine that replays train what eager steps
train."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import tiny_model

from energyat import params as P
from energyat.errors import UserError
from energyat.science.step_graphs import StepGraphs
from energyat.science.training import Trainer


class Recorder:
    """Stands in for torch.cuda's stream and graph API; logs what StepGraphs asks of it."""

    def __init__(self, fail: bool = False):
        self.log: list[str] = []
        self.capturing, self.fail = False, fail

    def install(self, monkeypatch):
        rec = self

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                rec.log.append("wait")

        class Graph:
            def replay(self):
                rec.log.append("replay")

        @contextlib.contextmanager
        def graph(g):
            rec.capturing = True
            yield
            rec.capturing = False
            if rec.fail:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

        for name, value in {"Stream": Stream, "stream": lambda s: contextlib.nullcontext(),
                            "current_stream": lambda device=None: Stream(), "synchronize": lambda device=None: None,
                            "CUDAGraph": Graph, "graph": graph}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_each_kind_of_step_is_warmed_up_then_captured_once_and_replayed(monkeypatch):
    rec = Recorder()
    rec.install(monkeypatch)
    w = torch.nn.Parameter(torch.ones(3))
    calls = []

    def fn(x, noise, flag):
        calls.append(("capture" if rec.capturing else "eager", flag, x.shape[0]))
        w.grad += x.sum() * (2 if flag else 1)  # as a backward would: into the existing .grad
        return {"sum": x.sum()}

    graphs = StepGraphs(fn, [w], torch.device("cpu"), batch=4, warmup=2)
    assert torch.equal(w.grad, torch.zeros(3))  # allocated once, up front
    x = torch.ones(4)
    for _ in range(4):
        graphs((x, None), (False,))
    assert calls == [("eager", False, 4)] * 2 + [("capture", False, 4)]
    assert rec.log.count("replay") == 2  # the capturing step and the next one replay
    static = graphs.graphs[(False,)][0][0]
    graphs((torch.full((4,), 7.0), None), (False,))
    assert torch.equal(static, torch.full((4,), 7.0))  # inputs are copied into the captured buffers
    graphs((x, None), (True,))  # another kind: its own warm-up
    graphs((torch.ones(3), None), (False,))  # a short batch never replays a graph made for 4
    assert calls[3:] == [("eager", True, 4), ("eager", False, 3)]
    assert rec.log.count("replay") == 3
    assert torch.equal(w.grad, torch.full((3,), 3.0))  # zeroed before each step: only the last one's gradient


def test_a_replaced_grad_is_refused(monkeypatch):
    Recorder().install(monkeypatch)
    w = torch.nn.Parameter(torch.ones(2))
    graphs = StepGraphs(lambda x: {}, [w], torch.device("cpu"), batch=2)
    w.grad = None  # what optimizer.zero_grad(set_to_none=True) would do
    with pytest.raises(RuntimeError, match="replaced"):
        graphs((torch.ones(2),), ())


def test_a_failed_capture_is_one_line_naming_the_way_out(monkeypatch):
    Recorder(fail=True).install(monkeypatch)
    w = torch.nn.Parameter(torch.ones(2))
    graphs = StepGraphs(lambda x: {}, [w], torch.device("cpu"), batch=2, warmup=0)
    with pytest.raises(UserError, match=r"not permitted when stream is capturing\); set cuda_graphs: false"):
        graphs((torch.ones(2),), ())


def test_trainer_uses_no_graphs_on_the_cpu():
    run = P.parse({"runs": {"pgd": {"method": "pgd", "der": {"start_epoch": -1}}}}).run("pgd")
    assert Trainer(tiny_model(), run, torch.device("cpu"), cuda_graphs=True).graphs is None


def test_cuda_graphs_param_is_a_boolean():
    assert P.parse({"runs": {"pgd": {"method": "pgd", "der": {"start_epoch": -1}}}}).cuda_graphs is True
    with pytest.raises(P.ParamsError, match="cuda_graphs"):
        P.parse({"cuda_graphs": "sometimes", "runs": {"pgd": {"method": "pgd", "der": {"start_epoch": -1}}}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["pgd", "fgsm", "gradalign", "trades"])
def test_graph_replays_train_what_eager_steps_train(method):
    """Three kinds of step (diagnostics on and off, then DER on), each warmed up, captured and replayed, then a
    short batch: the weights differ from the eager steps' no more than two eager runs differ from each other
    (non-deterministic CUDA kernels, amplified by the attacks' gradient signs, set that floor)."""
    run = P.parse({"train": {"eps": 0.1, "steps": 3, "batch_size": 16, "lr_max": 0.05},
                   "runs": {"pgd": {"method": "pgd", "der": {"start_epoch": -1}}, method: {"method": method}}}).run(method)
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    xb = torch.randint(0, 256, (16, 1, 16, 16), generator=g, dtype=torch.uint8).to(device)
    yb = torch.randint(0, 4, (16,), generator=g).to(device)
    plan = [(xb, yb, False, i % 2 == 0) for i in range(8)] + [(xb, yb, True, True)] * 4 + [(xb[:8], yb[:8], True, True)]
    start = tiny_model()

    def weights(graphs: bool) -> list[torch.Tensor]:
        model = copy.deepcopy(start)
        trainer = Trainer(model, run, device, cuda_graphs=graphs)
        gen = torch.Generator(device=device).manual_seed(0)
        for x, y, der_on, diagnose in plan:
            trainer.step(x, y, 0.05, der_on, diagnose, gen)
        assert len(trainer.graphs.graphs) == 3 if graphs else trainer.graphs is None
        return [p.detach().float().clone() for p in model.parameters()]

    def largest(a, b) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    eager = weights(False)
    floor, diff = largest(weights(False), eager), largest(weights(True), eager)
    print(f"{method}: graphs vs eager {diff:.3e}, eager vs eager {floor:.3e}")
    assert diff <= 10 * floor + 1e-5, f"graphs vs eager {diff:.3e}, eager vs eager {floor:.3e}"
