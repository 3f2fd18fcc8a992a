"""Model registry: sizes of the small CNN's options, and checkpoints that rebuild the same network."""
import pytest
import torch

from energyat import checkpoint
from energyat.errors import UserError
from energyat.models import init_lazy
from energyat.params import ModelCfg

GEOMETRY = {"dataset": "synthetic", "num_classes": 10, "channels": 1, "size": 28, "mean": [0.5], "std": [0.25]}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("width, hidden", [(32, 0), (16, 0), (32, 1024)])
def test_small_cnn_parameter_count_follows_width_and_hidden(width, hidden):
    model = checkpoint.new_model(checkpoint.model_meta(ModelCfg(width=width, hidden=hidden), GEOMETRY))
    convs = (9 * 1 + 1) * width + (9 * width + 1) * 2 * width + (9 * 2 * width + 1) * 2 * width
    features = 2 * width * 7 * 7  # two 2x poolings: 28 -> 7
    head = (features + 1) * hidden + (hidden + 1) * 10 if hidden else (features + 1) * 10
    assert n_params(model) == convs + head
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_checkpoint_rebuilds_the_options_it_was_saved_with(tmp_path):
    cfg = ModelCfg(width=8, hidden=64)
    model = checkpoint.new_model(checkpoint.model_meta(cfg, GEOMETRY)).eval()
    checkpoint.save(tmp_path / "m.pt", model, checkpoint.model_meta(cfg, GEOMETRY))
    loaded, meta = checkpoint.load(tmp_path / "m.pt", checkpoint.model_id(cfg))
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model(x)) and meta["options"] == {"width": 8, "hidden": 64}
    with pytest.raises(UserError, match="options="):
        checkpoint.load(tmp_path / "m.pt", checkpoint.model_id(ModelCfg(width=8)))


def test_colour_models_take_unit_range_input():
    meta = {**GEOMETRY, "channels": 3, "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    model = init_lazy(checkpoint.new_model({**meta, "arch": "preact-resnet18"}), 3, 32).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
