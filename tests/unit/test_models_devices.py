"""Architectures by name (torchvision, timm, a user's factory), the input contract inside the
model, weights read safely, and models that run wherever their parameters are.

There is no GPU here: device handling is checked through the dtype, which follows the same
path (``devices.forward`` moves a batch to the model's device *and* floating dtype, and
brings the output back), so a float64 model fed float32 data fails at the first forward
that bypasses it, exactly where a CUDA model fed CPU data would."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from unlearning.devices import DeviceError, forward, model_device, resolve_device
from unlearning.methods import ForgetSet, RetainSample, get_method, list_methods, unlearn
from unlearning.models import (
    ArchitectureError,
    CheckpointError,
    ModelSpec,
    WeightsError,
    arch_kind,
    build_model,
    check_arch,
    class_count_of,
    consumer_input,
    load_checkpoint,
    published_model,
    read_weights,
    save_checkpoint,
    state_dict_problem,
    weights_sha256,
)


def test_auto_picks_the_gpu_only_when_torch_sees_one():
    has_gpu = torch.cuda.is_available()
    assert resolve_device("auto").type == ("cuda" if has_gpu else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if has_gpu:
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(DeviceError, match="sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")


def test_forward_moves_the_batch_to_the_model_and_the_output_back():
    model = nn.Linear(4, 2).double()
    x = torch.rand(3, 4, requires_grad=True)
    out = forward(model, x)
    assert out.dtype == torch.float32 and out.device == x.device
    out.sum().backward()  # gradients flow back through both moves
    assert x.grad is not None and model.weight.grad is not None
    same = nn.Linear(4, 2)
    assert torch.equal(forward(same, x), same(x))  # on its own device/dtype: a no-op
    assert model_device(nn.Sequential()) == torch.device("cpu")


def _forget(ds, n=4):
    ids = list(range(n))
    return ForgetSet.build(ds.train_x[ids], ds.train_y[ids], "misclassify",
                           num_classes=ds.num_classes, ids=ids)


@pytest.fixture(scope="module")
def digits():
    from unlearning.datasets import load_dataset

    return load_dataset("digits")


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_a_model_placed_elsewhere(method, digits):
    """Every forward pass of every method goes through ``devices.forward`` (see the module
    docstring): a float64 model on float32 data, a BatchNorm-free user network."""
    import tiny_nets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), tiny_nets.no_bn_net(10)).double().eval()
    info = get_method(method)
    retain = RetainSample(digits.train_x[100:116], digits.train_y[100:116]) \
        if info.accepts_retain and (info.needs_retain or method == "l2ul") else None
    params = {"max_steps": 3}
    if method == "retrain":
        params["epochs"] = 1
    if method in ("l2ul", "l2ul-reference"):
        params.update(adv_per_instance=1, pgd_steps=2)
    if method == "l2ul":
        params.update(synthetic_anchors=8, retain_synthetic_anchors=8, synthesis_steps=2)
    result = unlearn(method, model, _forget(digits), params, retain=retain, seed=0)
    assert all(p.dtype == torch.float64 for p in result.model.parameters())
    if method == "l2ul":
        assert "BatchNorm" in result.info["synthetic_anchors_skipped"]
        assert result.info["synthetic_anchors"] == 0


def test_l2ul_inverts_batchnorm_when_there_is_some(digits_model):
    model, ds = digits_model
    result = unlearn("l2ul", model, _forget(ds, 2),
                     {"max_steps": 1, "synthetic_anchors": 4, "synthesis_steps": 1}, seed=0)
    assert result.info["synthetic_anchors"] == 4
    assert "synthetic_anchors_skipped" not in result.info


# -- architectures ----------------------------------------------------------------------------


def test_architecture_names():
    assert arch_kind("small-cnn") == "builtin"
    assert arch_kind("torchvision:resnet18") == "torchvision"
    assert arch_kind("timm:vit_tiny_patch16_224") == "timm"
    assert arch_kind("my_pkg.models:build") == "factory"
    for bad in ("vgg", "torchvision:", "pkg.mod:_private", "a b:c", "torchvision:x y"):
        with pytest.raises(ArchitectureError, match="unknown model"):
            arch_kind(bad)
    with pytest.raises(ArchitectureError, match="no classification model 'resnet1'"):
        check_arch("torchvision:resnet1")
    with pytest.raises(ArchitectureError, match="cannot import 'no_such_pkg.nets'"):
        check_arch("no_such_pkg.nets:build")
    with pytest.raises(ArchitectureError, match="has no function 'nope'"):
        check_arch("tiny_nets:nope")
    with pytest.raises(ArchitectureError, match="standard-library"):
        check_arch("os:system")
    with pytest.raises(ArchitectureError, match="not a torch nn.Module"):
        build_model(ModelSpec("tiny_nets:not_a_module", 1, 10, 8))


def test_timm_is_optional_and_says_how_to_get_it():
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ArchitectureError, match="pip install timm"):
            check_arch("timm:resnet18")
    else:
        assert check_arch("timm:resnet18") == "timm:resnet18"


def test_the_input_contract_is_the_first_layer_and_consumers_get_the_network():
    """Gray 8x8 pixels become the 3x16x16 normalised input a torchvision network takes."""
    spec = ModelSpec("torchvision:squeezenet1_1", 1, 10, 8, [0.5] * 3, [0.25] * 3,
                     net_channels=3, net_size=32, contract="preprocessed")
    model = build_model(spec).eval()
    x = torch.rand(2, 1, 8, 8)
    pre = consumer_input(model, spec, x)
    assert pre.shape == (2, 3, 32, 32)
    expected = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(32, 32),
                                               mode="bilinear", antialias=True)
    assert torch.allclose(pre, (expected - 0.5) / 0.25)
    net = published_model(model, spec)
    assert net is model[1]
    with torch.no_grad():
        assert torch.equal(net(pre), model(x))
    pixels = ModelSpec("small-cnn", 1, 10, 8)
    assert published_model(build_model(pixels), pixels) is not None
    with pytest.raises(ValueError, match="only 1 <-> 3"):
        ModelSpec("small-cnn", 2, 10, 8, net_channels=3)
    with pytest.raises(ValueError, match="mean has 1 value"):
        ModelSpec("small-cnn", 1, 10, 8, [0.5], [0.5], net_channels=3)


def test_a_factory_checkpoint_round_trips_and_names_a_missing_module(tmp_path):
    spec = ModelSpec("tiny_nets:no_bn_net", 1, 10, 8, [0.0], [1.0], contract="preprocessed")
    model = build_model(spec)
    sha = save_checkpoint(tmp_path / "m.pt", model, spec)
    loaded, loaded_spec = load_checkpoint(tmp_path / "m.pt", sha)
    assert loaded_spec == spec and weights_sha256(loaded) == sha
    gone = ModelSpec("gone_pkg.nets:build", 1, 10, 8)
    torch.save({"spec": gone.__dict__, "state_dict": model.state_dict()}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="cannot import 'gone_pkg.nets'") as e:
        load_checkpoint(tmp_path / "g.pt")
    assert "\n" not in str(e.value)


# -- weights ----------------------------------------------------------------------------------


def test_a_state_dict_that_does_not_fit_names_the_first_bad_key():
    import tiny_nets

    net = tiny_nets.no_bn_net(10)
    state = net.state_dict()
    assert state_dict_problem(net, state) is None
    missing = {k: v for k, v in state.items() if k != "head.bias"}
    assert state_dict_problem(net, missing) == "missing key 'head.bias'"
    extra = {**state, "fc.weight": torch.zeros(1)}
    assert state_dict_problem(net, extra) == "unexpected key 'fc.weight'"
    shaped = {**state, "head.weight": torch.zeros(10, 32)}
    assert state_dict_problem(net, shaped) == ("key 'head.weight' has shape (10, 32) in the "
                                               "weights, the architecture expects (10, 64)")
    five = tiny_nets.no_bn_net(5).state_dict()
    assert class_count_of("tiny_nets:no_bn_net", five, 10, 1) == 5
    assert class_count_of("tiny_nets:no_bn_net", shaped, 10, 1) is None


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_weights_are_read_weights_only(tmp_path):
    import tiny_nets

    net = tiny_nets.no_bn_net(10)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "dp.pt")
    state, spec = read_weights(tmp_path / "dp.pt")
    assert set(state) == set(net.state_dict()) and spec is None
    torch.save(net, tmp_path / "whole.pt")  # the whole module: pickled code
    with pytest.raises(WeightsError, match="not a weights-only state_dict"):
        read_weights(tmp_path / "whole.pt")
    torch.save({"w": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="not a weights-only state_dict"):
        read_weights(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a file written by torch.save"):
        read_weights(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="does not hold a state_dict"):
        read_weights(tmp_path / "list.pt")
    spec = ModelSpec("small-cnn", 1, 10, 8)
    save_checkpoint(tmp_path / "ours.pt", build_model(spec), spec)
    assert read_weights(tmp_path / "ours.pt")[1] == spec
