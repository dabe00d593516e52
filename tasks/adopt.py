"""``unlearn adopt``: a classifier the user already has becomes version 1, the first champion.

Two sources, both read without running pickled code unless the user consents:

- a ``state_dict`` file (``torch.save(model.state_dict(), FILE)``) plus an architecture name
  (``unlearning.models.ARCH_FORMS``), read with ``torch.load(weights_only=True)``;
- a model in another MLflow tracking store (``models:/NAME/3``, ``models:/NAME@alias``,
  ``runs:/<id>/model``). In order of preference: a state dict the source run logged
  (``mlflow.pytorch.log_state_dict``: ``state_dict.pth``; or this project's
  ``checkpoint/model.pt``), then a ``pt2`` model (torch.export; MLflow checks the archive is
  free of pickled records before loading it), then, only with ``allow_pickle``, a model
  logged with ``serialization_format="pickle"`` (loading it unpickles code from that store).

The user's input contract (channels, size, mean/std) becomes the model's first layer
(``models.Normalize``): the pipeline feeds it the dataset's pixels in [0, 1], and what
consumers load from the registry is the user's network alone, which takes their own
preprocessed input as before (``contract="preprocessed"``). Classes keep the dataset's order
(``classes`` names them to check).

Bad input raises AdoptError (one line, nothing written): an unknown architecture, weights
that do not fit it (the first missing, unexpected or mis-shaped key), a class count other
than the dataset's, a pickle where weights were expected, a URI that does not resolve.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .params import PipelineParams
from .paths import Paths

# run artifacts that hold a weights-only state dict, in order of preference
STATE_DICT_ARTIFACTS = ("checkpoint/model.pt", "state_dict.pth")
SOURCE_FILE = "source.json"  # data/base/source.json: where version 1 came from


class AdoptError(ValueError):
    """Bad input for ``unlearn adopt``: one line, and nothing was registered."""


@dataclass(frozen=True)
class AdoptRequest:
    """What ``unlearn adopt`` was asked (JSON-able, so it can be a flow parameter)."""

    arch: str | None = None
    weights: str | None = None
    from_mlflow: str | None = None
    source_tracking_uri: str | None = None
    allow_pickle: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    image_size: int | None = None  # the side the network takes (None: the dataset's)
    channels: int | None = None  # the channels the network takes (None: see default_net_channels)
    classes: list[str] | None = None  # the network's classes in output order, to check

    def __post_init__(self) -> None:
        if (self.weights is None) == (self.from_mlflow is None):
            raise AdoptError("name exactly one source: --weights FILE or --from-mlflow URI")
        if self.weights is not None and not self.arch:
            raise AdoptError("--weights needs --arch (e.g. torchvision:resnet18, timm:NAME or "
                             "package.module:function)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdoptRequest:
        return cls(**dict(data))


@dataclass
class Weights:
    """A state dict read from a source, and where it came from."""

    state: dict[str, Any]
    source: str
    source_sha256: str
    source_format: str
    spec: Any = None  # this project's ModelSpec, when the source is one of its checkpoints
    notes: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


# -- reading the source -----------------------------------------------------------------------


def weights_from_file(path: str) -> Weights:
    from unlearning.models import WeightsError, read_weights

    file = Path(path).expanduser()
    try:
        state, spec = read_weights(file)
    except WeightsError as e:
        raise AdoptError(str(e)) from None
    return Weights(state, file.resolve().as_uri(), _sha256(file), "state_dict", spec)


@contextmanager
def _pickle_allowed(allowed: bool) -> Iterator[None]:
    """MLflow's switch for unpickling, for the duration of one load (restored after)."""
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    before = os.environ.get(key)
    os.environ[key] = "true" if allowed else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _check_store(tracking_uri: str) -> None:
    """A sqlite store that does not exist would be created empty by MLflow: refuse instead."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
        db = db if tracking_uri.startswith("sqlite:////") or db.is_absolute() else Path.cwd() / db
        if not db.is_file():
            raise AdoptError(f"the source tracking store {tracking_uri} does not exist "
                             f"({db} is not a file)")


def _source_run(client, uri: str) -> str | None:
    """The run that logged the model ``uri`` names (None if MLflow does not say)."""
    from mlflow.exceptions import MlflowException

    try:
        if uri.startswith("runs:/"):
            return uri.removeprefix("runs:/").split("/")[0] or None
        if uri.startswith("models:/"):
            rest = uri.removeprefix("models:/")
            if "@" in rest.split("/")[0]:
                name, alias = rest.split("/")[0].split("@", 1)
                return client.get_model_version_by_alias(name, alias).run_id
            parts = rest.split("/")
            if len(parts) >= 2 and parts[1].isdigit():
                return client.get_model_version(parts[0], parts[1]).run_id
            if parts[0].startswith("m-"):
                return client.get_logged_model(parts[0]).source_run_id
    except MlflowException as e:
        raise AdoptError(f"{uri} does not resolve in {client.tracking_uri}: "
                         f"{_first_line(e)}") from None
    return None


def _run_state_dict(client, run_id: str, scratch: Path) -> tuple[Path, str] | None:
    """A weights-only state dict logged by the source run (STATE_DICT_ARTIFACTS, at the top
    or one folder down), downloaded; None if it logged none."""
    from mlflow.exceptions import MlflowException

    try:
        top = client.list_artifacts(run_id)
        found = [a.path for a in top if not a.is_dir]
        for folder in (a.path for a in top if a.is_dir):
            found += [a.path for a in client.list_artifacts(run_id, folder) if not a.is_dir]
    except MlflowException:
        return None
    for wanted in STATE_DICT_ARTIFACTS:
        for path in found:
            if path == wanted or path.endswith("/" + wanted) or (
                    "/" not in wanted and Path(path).name == wanted):
                local = client.download_artifacts(run_id, path, str(scratch))
                return Path(local), path
    return None


def _download_model(client, tracking_uri: str, uri: str, dst: Path) -> Path:
    """The model folder ``uri`` names, downloaded through ``client`` (its own tracking and
    registry store: ``mlflow.artifacts.download_artifacts`` resolves ``models:/`` URIs in the
    process-wide registry instead)."""
    from mlflow.artifacts import download_artifacts

    dst.mkdir(parents=True, exist_ok=True)
    source = uri
    if uri.startswith("models:/"):
        name_version = uri.removeprefix("models:/").split("/")
        head = name_version[0]
        if "@" in head:
            name, alias = head.split("@", 1)
            source = client.get_model_version_by_alias(name, alias).source
        elif len(name_version) >= 2 and name_version[1].isdigit():
            source = client.get_model_version(head, name_version[1]).source
        elif not head.startswith("m-"):
            raise AdoptError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {uri!r}")
        if source.startswith("models:/m-"):  # an MLflow 3 logged model: its own location
            source = client.get_logged_model(source.removeprefix("models:/").split("/")[0]) \
                .artifact_location
    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        return Path(client.download_artifacts(run_id, path, str(dst)))
    return Path(download_artifacts(artifact_uri=source, dst_path=str(dst),
                                   tracking_uri=tracking_uri))


def weights_from_mlflow(uri: str, tracking_uri: str, allow_pickle: bool,
                        scratch: Path) -> Weights:
    import mlflow.pytorch
    import yaml
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from unlearning.models import WeightsError, as_state_dict, read_weights

    if not uri.startswith(("models:/", "runs:/")):
        raise AdoptError(f"expected a models:/NAME/VERSION, models:/NAME@ALIAS or "
                         f"runs:/RUN_ID/PATH URI, got {uri!r}")
    _check_store(tracking_uri)
    where = f"{uri} (tracking store {tracking_uri})"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id = _source_run(client, uri)
    if run_id is not None:  # the weights-only path first
        found = _run_state_dict(client, run_id, scratch / "run")
        if found is not None:
            local, name = found
            try:
                state, spec = read_weights(local)
            except WeightsError as e:
                raise AdoptError(f"{where}: artifact {name}: {e}") from None
            return Weights(state, where, _sha256(local), f"mlflow-state_dict:{name}", spec)
    try:
        folder = _download_model(client, tracking_uri, uri, scratch / "model")
    except (MlflowException, OSError) as e:
        raise AdoptError(f"{uri} does not resolve in {tracking_uri}: {_first_line(e)}") from None
    try:
        flavor = (yaml.safe_load((folder / "MLmodel").read_text()) or {})["flavors"]["pytorch"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise AdoptError(f"{where} is not an MLflow PyTorch model (no pytorch flavor in its "
                         "MLmodel)") from None
    data = folder / str(flavor.get("model_data") or "data")
    if (data / "model.pt2").is_file():
        fmt, file = "mlflow-pt2", data / "model.pt2"
    elif (data / "model.pth").is_file():
        fmt, file = "mlflow-pickle", data / "model.pth"
        if not allow_pickle:
            raise AdoptError(
                f"{where} was logged with serialization_format='pickle': loading it unpickles "
                "code from that store, which can run anything. Pass --allow-pickle if you "
                "trust it, or log its state dict there (mlflow.pytorch.log_state_dict) or the "
                "model as pt2")
    else:
        raise AdoptError(f"{where}: no data/model.pt2 or data/model.pth in the model")
    try:
        state, spec = read_weights(file)  # a state dict logged as the model: no code at all
        return Weights(state, where, _sha256(file), fmt + ":state_dict", spec)
    except WeightsError:
        pass
    try:
        with _pickle_allowed(fmt == "mlflow-pickle" and allow_pickle):
            module = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    except Exception as e:  # noqa: BLE001  (MLflow's refusal or the unpickler's failure)
        raise AdoptError(f"{where}: cannot load the model ({_first_line(e)})") from None
    try:
        state = as_state_dict({k: v.detach().cpu() for k, v in module.state_dict().items()},
                              where)
    except (WeightsError, AttributeError) as e:
        raise AdoptError(f"{where}: {e}") from None
    notes = ["loaded by unpickling (--allow-pickle)"] if fmt == "mlflow-pickle" else []
    return Weights(state, where, _sha256(file), fmt, None, notes)


# -- building and checking the adopted model --------------------------------------------------


def _contract_spec(request: AdoptRequest, dataset, arch: str):
    from unlearning.models import ModelSpec, default_net_channels

    c, h, w = dataset.image_shape
    if h != w:
        raise AdoptError(f"the dataset's images are {h}x{w}; adopt needs square images "
                         "(set dataset.image_size to resize them)")
    channels = request.channels or default_net_channels(arch, c)
    size = request.image_size or h
    mean = list(request.mean) if request.mean is not None else [0.0] * channels
    std = list(request.std) if request.std is not None else [1.0] * channels
    if len(mean) == 1 and channels > 1:
        mean = mean * channels
    if len(std) == 1 and channels > 1:
        std = std * channels
    try:
        return ModelSpec(arch, c, dataset.num_classes, h, mean, std,
                         net_channels=channels if channels != c else 0,
                         net_size=size if size != h else 0, contract="preprocessed")
    except ValueError as e:
        raise AdoptError(f"input contract: {e}") from None


def _fit(spec, weights: Weights, dataset) -> Any:
    """``Sequential(Normalize, net)`` with the source's weights in the net, or AdoptError."""
    import torch

    from unlearning.models import (
        ArchitectureError,
        build_model,
        check_arch,
        class_count_of,
        state_dict_problem,
    )

    try:
        check_arch(spec.arch)
        model = build_model(spec)
    except ArchitectureError as e:
        raise AdoptError(str(e)) from None
    net = model[1]
    problem = state_dict_problem(net, weights.state)
    if problem is not None:
        other = class_count_of(spec.arch, weights.state, spec.num_classes, spec.channels)
        if other is not None:
            raise AdoptError(f"the weights are for {other} classes, the dataset "
                             f"({dataset.name}) has {spec.num_classes}: adopt a model of the "
                             "dataset's classes, in its order")
        raise AdoptError(f"the weights do not fit {spec.arch}: {problem}")
    net.load_state_dict(weights.state)
    model.eval()
    x = dataset.test_x[:2]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001  (the user's network on the contract's input)
        raise AdoptError(f"{spec.arch} cannot take the input {spec.channels}x{spec.size}x"
                         f"{spec.size} (check --channels / --image-size): "
                         f"{_first_line(e)}") from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[1] != spec.num_classes:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise AdoptError(f"{spec.arch} returns {shape} for 2 images; the dataset "
                         f"({dataset.name}) needs logits of its {spec.num_classes} classes")
    return model


def _check_exportable(model, spec, dataset) -> None:
    """Consumers load the published network with a plain MLflow client, as a pt2 program:
    refuse now, before anything is registered, a network torch.export cannot capture."""
    import torch
    from torch.export import Dim

    from unlearning.models import consumer_input, published_model

    net = published_model(model, spec)
    x = consumer_input(model, spec, dataset.test_x[:4])
    try:
        torch.export.export(net, (x,), dynamic_shapes=({0: Dim.AUTO},))
    except Exception as e:  # noqa: BLE001  (what torch.export says, on one line)
        raise AdoptError(f"{spec.arch} cannot be exported with torch.export, which the "
                         f"registry needs so a plain MLflow client can load it: "
                         f"{_first_line(e)[:300]}") from None


def adopt_model(paths: Paths, cfg: PipelineParams, request: AdoptRequest,
                out: Path) -> dict[str, Any]:
    """Read, check, evaluate and save the adopted model (``out``: its checkpoint), and copy
    it with its source record into ``data/base`` (DVC-tracked: what ``dvc repro`` and
    ``unlearn verify`` rebuild version 1 from). Raises AdoptError for bad input."""
    from unlearning.devices import describe_device
    from unlearning.models import input_contract, save_checkpoint
    from unlearning.train import accuracy

    from .release import dataset_of

    data = dataset_of(cfg)
    if request.classes is not None and tuple(request.classes) != tuple(data.class_names):
        raise AdoptError(f"the model's classes {list(request.classes)} are not the dataset's "
                         f"{list(data.class_names)} in that order ({data.name})")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unlearn-adopt-") as tmp:
        if request.weights is not None:
            weights = weights_from_file(request.weights)
        else:
            assert request.from_mlflow is not None
            tracking = request.source_tracking_uri or paths.tracking_uri
            weights = weights_from_mlflow(request.from_mlflow, tracking, request.allow_pickle,
                                          Path(tmp))
    if weights.spec is not None:  # one of this project's checkpoints: its own contract
        spec = weights.spec
        if request.arch and request.arch != spec.arch:
            raise AdoptError(f"the source is a {spec.arch} checkpoint of this project, not "
                             f"{request.arch}")
        if (spec.in_channels, spec.image_size, spec.num_classes) != (
                data.image_shape[0], data.image_shape[1], data.num_classes):
            raise AdoptError(f"the source checkpoint takes {spec.in_channels}x"
                             f"{spec.image_size}x{spec.image_size} images of "
                             f"{spec.num_classes} classes; {data.name} has "
                             f"{'x'.join(map(str, data.image_shape))} and {data.num_classes}")
        from unlearning.models import build_model, state_dict_problem

        model = build_model(spec)
        problem = state_dict_problem(model, weights.state)
        if problem:
            raise AdoptError(f"the source checkpoint does not fit its own spec: {problem}")
        model.load_state_dict(weights.state)
        model.eval()
    else:
        if not request.arch:
            raise AdoptError(f"{weights.source} holds weights only: name their architecture "
                             "with --arch")
        spec = _contract_spec(request, data, request.arch)
        model = _fit(spec, weights, data)
    _check_exportable(model, spec, data)
    device = cfg.runtime.torch_device()
    model.to(device)
    test_acc = accuracy(model, data.test_x, data.test_y)
    train_acc = accuracy(model, data.train_x, data.train_y)
    sha = save_checkpoint(out, model, spec)
    chance = 100.0 / data.num_classes
    warnings = []
    if test_acc < 2 * chance:
        warnings.append(f"held-out accuracy {test_acc:.2f}% is near chance ({chance:.1f}%): "
                        "check the input contract (--channels, --image-size, --mean, --std) "
                        "and that the classes are in the dataset's order")
    record = {"kind": "adopt", "source": weights.source, "source_sha256": weights.source_sha256,
              "source_format": weights.source_format, "arch": spec.arch,
              "weights_sha256": sha, "input_contract": input_contract(spec),
              "classes": list(data.class_names), "notes": weights.notes}
    write_base(paths, record, out)
    return {"path": str(out), "weights_sha256": sha, "spec": asdict(spec),
            "device": describe_device(device), "seconds": time.perf_counter() - start,
            "test_acc": test_acc, "train_acc": train_acc, "warnings": warnings,
            **{k: record[k] for k in ("source", "source_sha256", "source_format",
                                      "input_contract", "classes")}}


# -- data/base: where version 1 came from -----------------------------------------------------


def write_base(paths: Paths, record: dict[str, Any], checkpoint: Path | None = None) -> None:
    """``data/base/source.json`` (and ``model.pt`` for an adopted model; a pretrained one is
    rebuilt from params.yaml, so it keeps no copy)."""
    folder = paths.data / "base"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.pt"
    if checkpoint is not None:
        tmp = target.with_name("model.pt.tmp")
        shutil.copyfile(checkpoint, tmp)
        tmp.replace(target)
    elif target.exists():
        target.unlink()
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    source = folder / SOURCE_FILE
    if not source.is_file() or source.read_text() != text:
        source.write_text(text)


def read_base(paths: Paths) -> dict[str, Any]:
    """The record of where version 1 came from (``{"kind": "pretrain"}`` when none)."""
    try:
        return dict(json.loads((paths.data / "base" / SOURCE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {"kind": "pretrain"}


def rebuild_adopted(paths: Paths, cfg: PipelineParams, out: Path) -> dict[str, Any]:
    """Version 1 of an adopted model, from ``data/base`` (the reproducible path's base: a
    copy, checked against the recorded weights_sha256, and its accuracies), in the shape
    of ``release.pretrain_model``'s result."""
    from unlearning.devices import describe_device
    from unlearning.models import CheckpointError, load_checkpoint
    from unlearning.train import accuracy

    from .release import dataset_of

    record = read_base(paths)
    source = paths.data / "base" / "model.pt"
    try:
        model, spec = load_checkpoint(source, record.get("weights_sha256"))
    except CheckpointError as e:
        raise CheckpointError(f"data/base: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out)
    device = cfg.runtime.torch_device()
    model.to(device)
    data = dataset_of(cfg)
    return {"path": str(out), "weights_sha256": record.get("weights_sha256"), "seconds": 0.0,
            "spec": asdict(spec), "device": describe_device(device),
            "train_acc": accuracy(model, data.train_x, data.train_y),
            "test_acc": accuracy(model, data.test_x, data.test_y)}
