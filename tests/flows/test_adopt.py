"""``unlearn adopt``: a team's own classifier becomes version 1, and the releases built from it
are drop-in replacements for it.

The team's side is played by plain scripts that know nothing of this project (its packages
are blocked in them). One writes the digits images as an image folder
(``train/<class>/NNNN.png``, ``test/<class>/NNNN.png``), trains a torchvision ShuffleNet on
it with the team's preprocessing (torchvision's ImageFolder, which loads RGB; ``Resize`` to
12x12; ``Normalize``), saves its ``state_dict`` and logs the model to the team's own MLflow
store (pt2, and pickle). Another loads models with a plain MLflow client and predicts on image
files with that same preprocessing. The project sees the folder as ``dataset.name:
image-folder`` and deletions name images by key (their path in the folder).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from flow_helpers import cli, cli_json

from tasks.paths import Paths

pytestmark = pytest.mark.flow

ARCH = "torchvision:shufflenet_v2_x0_5"
CONTRACT = ["--image-size", "12", "--mean", "0.5", "--std", "0.25"]
ERROR_LINE = re.compile(r"^unlearn adopt: error: ")
PLAIN_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# a fast release on a small, sharp network: fewer BatchNorm-inverted anchors; the gate on
# held-out accuracy allows 5 points (three images of a 88%-on-train ShuffleNet)
ADOPT_PARAMS = {"unlearn": {"params": {"synthetic_anchors": 64}},
                "evaluate": {"mia_max_per_side": 100}, "gates": {"max_test_drop": 5.0}}

# the team's preprocessing, in both of its scripts
PREPROCESS = textwrap.dedent("""
    import sys
    for blocked in ("unlearning", "tasks", "flows"):  # none of this project's code
        sys.modules[blocked] = None
    import json
    from pathlib import Path
    import torch, torch.nn.functional as F
    import torchvision.transforms as T

    # ImageFolder loads RGB; the network takes 12x12, normalised
    PREPROCESS = T.Compose([T.ToTensor(), T.Resize((12, 12)),
                            T.Normalize([0.5] * 3, [0.25] * 3)])
""")

TRAIN = PREPROCESS + textwrap.dedent("""
    import mlflow, mlflow.pytorch
    from PIL import Image
    from sklearn.datasets import load_digits
    from torchvision.datasets import ImageFolder
    from torchvision.models import shufflenet_v2_x0_5

    out, store = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = out / "images" / ("test" if i % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype("uint8")).save(folder / f"{i:04d}.png")
    train = ImageFolder(out / "images" / "train", transform=PREPROCESS)
    x, y = torch.stack([image for image, _ in train]), torch.tensor(train.targets)
    net = shufflenet_v2_x0_5(weights=None, num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(4):
        net.train()
        for idx in torch.randperm(len(x)).split(32)[:-1]:  # no tiny last batch (BatchNorm)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    torch.save(net.state_dict(), out / "weights.pt")
    mlflow.set_tracking_uri(store)
    with mlflow.start_run():
        mlflow.pytorch.log_model(net, name="model", input_example=x[:4].numpy(),
                                 registered_model_name="their-model", pip_requirements=["torch"])
        mlflow.pytorch.log_model(net, name="pickled", serialization_format="pickle",
                                 registered_model_name="their-pickled-model",
                                 pip_requirements=["torch"])
    with torch.no_grad():
        print(json.dumps({"train_acc": (net(x).argmax(1) == y).float().mean().item()}))
""")

PREDICT = PREPROCESS + textwrap.dedent("""
    import mlflow, mlflow.pytorch
    from PIL import Image
    from torchvision.models import shufflenet_v2_x0_5

    store, weights, root, files, *uris = sys.argv[1:]
    x = torch.stack([PREPROCESS(Image.open(Path(root) / f).convert("RGB"))
                     for f in json.loads(files)])
    theirs = shufflenet_v2_x0_5(weights=None, num_classes=10)
    theirs.load_state_dict(torch.load(weights, weights_only=True))
    mlflow.set_tracking_uri(store)
    models = {"theirs": theirs.eval(), **{u: mlflow.pytorch.load_model(u) for u in uris}}
    with torch.no_grad():
        print(json.dumps({k: m(x).argmax(1).tolist() for k, m in models.items()}))
""")


def _run(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``script`` in a plain Python process working in ``cwd``: an MLflow store on SQLite
    keeps its artifacts under ./mlruns of the process that creates it, which must not be the
    checkout (the project's own mlruns/ would then hold a stranger's models)."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=PLAIN_ENV, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The team's images, trained model (``weights.pt``) and MLflow store (``theirs.db``)."""
    folder = tmp_path_factory.mktemp("team")
    store = f"sqlite:///{folder / 'theirs.db'}"
    done = _run(TRAIN, str(folder), store, cwd=folder)
    train_acc = json.loads(done.stdout.strip().splitlines()[-1])["train_acc"]
    assert train_acc > 0.6, train_acc  # a small model, but a model
    return {"folder": folder, "images": folder / "images", "weights": str(folder / "weights.pt"),
            "store": store}


def _on_their_images(team, home: Paths, write_params) -> None:
    write_params(home.home, dataset={"name": "image-folder", "data_dir": str(team["images"])},
                 **ADOPT_PARAMS)


def _versions(paths: Paths) -> list[dict]:
    if not (paths.mlruns / "mlflow.db").exists():
        return []
    rc, listing = cli_json("releases")
    assert rc == 0
    return listing["versions"]


def _delete_and_release(team, paths: Paths) -> None:
    """Three training images the adopted model gets right are deleted by key (misclassify)
    and released as version 2; the team's client, on its own preprocessing, sees exactly
    those change and held-out accuracy hold."""
    from unlearning.datasets import load_dataset
    from unlearning.models import load_checkpoint
    from unlearning.train import predict_logits

    data = load_dataset("image-folder", team["images"])
    model, _ = load_checkpoint(paths.artifacts / "adopt" / "model.pt")
    right = (predict_logits(model, data.train_x).argmax(1) == data.train_y).nonzero().flatten()
    keys = [data.train_keys[int(right[i])] for i in (0, len(right) // 2, len(right) - 1)]
    manifest = paths.home / "erase.csv"
    manifest.write_text("request_id,instance_key,objective,new_label\n"
                        + "".join(f"erase-{i},{k},misclassify,\n" for i, k in enumerate(keys)))
    rc, _out, err = cli("submit", str(manifest))
    assert rc == 0, err
    rc, result = cli_json("run")
    [batch] = result["batches"]
    assert rc == 0 and batch["state"] == "done", (batch["state"], batch.get("reason"))
    assert result["champion"] == 2

    held_out = sorted(str(p.relative_to(team["images"]))
                      for p in (team["images"] / "test").rglob("*.png"))
    files = keys + held_out
    preds = _run(PREDICT, paths.tracking_uri, team["weights"], str(team["images"]),
                 json.dumps(files), "models:/forget-classifier/1",
                 "models:/forget-classifier@champion",
                 cwd=team["folder"]).stdout.strip().splitlines()[-1]
    found = json.loads(preds)
    theirs, v1, champion = (found[k] for k in ("theirs", "models:/forget-classifier/1",
                                               "models:/forget-classifier@champion"))
    assert v1 == theirs  # version 1 is their model, on their own preprocessing
    labels = [int(f.split("/")[1]) for f in files]
    for i in range(len(keys)):  # forgotten: right before, away from the label now
        assert theirs[i] == labels[i] != champion[i], (keys[i], theirs[i], champion[i])
    n = len(keys)
    acc = lambda p: sum(a == b for a, b in zip(p[n:], labels[n:])) / len(labels[n:])
    assert acc(champion) >= acc(theirs) - 0.05, (acc(champion), acc(theirs))


def test_adopt_a_state_dict_then_release_a_deletion(team, home, prefect_server,
                                                   write_params):
    _on_their_images(team, home, write_params)
    rc, result = cli_json("adopt", "--arch", ARCH, "--weights", team["weights"], *CONTRACT)
    assert rc == 0 and result["status"] == "ok" and result["version"] == 1, result
    [v1] = _versions(home)
    assert v1["aliases"] == ["champion"] and v1["metrics"]["test_acc"] > 60
    tags = v1["lineage"]
    assert tags["method"] == "adopt" and tags["arch"] == ARCH and tags["device"] == "cpu"
    assert tags["source"] == Path(team["weights"]).resolve().as_uri()
    assert tags["source_sha256"] == hashlib.sha256(Path(team["weights"]).read_bytes()).hexdigest()
    contract = json.loads(tags["input_contract"])
    assert contract["input"] == "preprocessed" and contract["shape"] == [3, 12, 12]
    assert json.loads(tags["classes"]) == [str(c) for c in range(10)]
    assert json.loads((home.data / "base" / "source.json").read_text())["kind"] == "adopt"

    _delete_and_release(team, home)
    [_, v2] = _versions(home)
    assert v2["lineage"]["input_contract"] == tags["input_contract"]  # releases keep it

    rc, verified = cli_json("verify", "1")  # the adopted base: data/base, as registered
    assert rc == 0 and verified["verified"] == [1], verified

    # a second base is refused: the state guard names the committed deletions it could
    # bring back (exit 1), or, without it, the registry check calls it bad input (exit 2)
    rc, _out, err = cli("adopt", "--arch", ARCH, "--weights", team["weights"], *CONTRACT)
    assert (rc == 1 and "committed deletion" in err) or (
        rc == 2 and "already has 2 version(s)" in err), err
    assert len(_versions(home)) == 2


def test_adopt_from_another_mlflow_store_then_release_a_deletion(team, home, prefect_server,
                                                                 write_params, monkeypatch):
    _on_their_images(team, home, write_params)
    rc, result = cli_json("adopt", "--from-mlflow", "models:/their-model/1",
                          "--source-tracking-uri", team["store"], "--arch", ARCH, *CONTRACT)
    assert rc == 0 and result["version"] == 1, result
    assert result["source_format"] == "mlflow-pt2"  # read as a pickle-free pt2 program
    assert result["source"].startswith("models:/their-model/1 (tracking store sqlite:")
    # adopt only into an empty registry: a second base is bad input (exit 2), nothing added
    rc, _out, err = cli("adopt", "--arch", ARCH, "--weights", team["weights"], *CONTRACT)
    assert rc == 2 and "already has 1 version(s)" in err and len(_versions(home)) == 1, err
    _delete_and_release(team, home)

    # a release built on another device (here: its tag says so) is rebuilt, and verify says
    # where each side was built: equal weights are reported as reproduced across devices,
    # different ones as not comparable, never as a divergence it cannot prove
    from mlflow import MlflowClient

    import tasks.release

    gpu = "cuda (NVIDIA H100 80GB HBM3, CUDA 13.0, torch 2.14.1)"
    MlflowClient(tracking_uri=home.tracking_uri).set_model_version_tag(
        "forget-classifier", "2", "device", gpu)
    rc, out, err = cli("verify", "2")
    assert rc == 0 and f"(built on {gpu}, rebuilt on cpu)" in out, out + err
    rebuild = tasks.release.rebuild_release
    monkeypatch.setattr(tasks.release, "rebuild_release", lambda *a, **k: {
        **rebuild(*a, **k), "weights_sha256": "0" * 64})  # as GPU kernels would: other floats
    rc, out, err = cli("verify", "2")
    assert rc == 1 and f"NOT COMPARABLE here: built on {gpu}, rebuilt on cpu" in out, out + err
    assert "cannot be compared here" in err and "DIVERGED" not in out, err


def test_a_pickled_mlflow_model_needs_consent(team, home, prefect_server):
    args = ["adopt", "--from-mlflow", "models:/their-pickled-model/1", "--source-tracking-uri",
            team["store"], "--arch", ARCH, *CONTRACT]
    rc, _out, err = cli(*args)
    assert rc == 2 and "--allow-pickle" in err and not _versions(home), err
    rc, result = cli_json(*args, "--allow-pickle")
    assert rc == 0 and result["source_format"] == "mlflow-pickle", result


def _tiny_weights(folder: Path, name: str, classes: int = 10, drop: str | None = None,
                  whole: bool = False) -> str:
    import tiny_nets

    net = tiny_nets.no_bn_net(classes)
    path = folder / name
    if whole:
        torch.save(net, path)
    else:
        torch.save({k: v for k, v in net.state_dict().items() if k != drop}, path)
    return str(path)


BAD = [  # (id, argv builder, message); every one: exit 2, one line, nothing registered
    ("unknown-architecture",
     lambda t, f: ["--arch", "torchvision:resnet1", "--weights", t["weights"]],
     "torchvision has no classification model 'resnet1'"),
    ("no-such-factory-module",
     lambda t, f: ["--arch", "their_lab.nets:build", "--weights", t["weights"]],
     "cannot import 'their_lab.nets'"),
    ("weights-missing-a-key",
     lambda t, f: ["--arch", "tiny_nets:no_bn_net", "--weights",
                   _tiny_weights(f, "missing.pt", drop="head.bias")],
     "do not fit tiny_nets:no_bn_net: missing key 'head.bias'"),
    ("weights-of-another-architecture",
     lambda t, f: ["--arch", "tiny_nets:no_bn_net", "--weights", t["weights"]],
     "do not fit tiny_nets:no_bn_net: missing key 'features.0.weight'"),
    ("another-class-count",
     lambda t, f: ["--arch", "tiny_nets:no_bn_net", "--weights",
                   _tiny_weights(f, "five.pt", classes=5)],
     r"the weights are for 5 classes, the dataset \(digits\) has 10"),
    ("input-the-network-cannot-take",
     lambda t, f: ["--arch", "tiny_nets:no_bn_net", "--channels", "3", "--weights",
                   _tiny_weights(f, "gray.pt")],
     "cannot take the input 3x8x8"),
    ("a-pickle-not-a-state-dict",
     lambda t, f: ["--arch", "tiny_nets:no_bn_net", "--weights",
                   _tiny_weights(f, "whole.pt", whole=True)],
     "not a weights-only state_dict"),
    ("classes-in-another-order",
     lambda t, f: ["--arch", ARCH, "--weights", t["weights"], "--classes",
                   "9,8,7,6,5,4,3,2,1,0", *CONTRACT],
     "are not the dataset's"),
    ("mlflow-uri-that-does-not-resolve",
     lambda t, f: ["--from-mlflow", "models:/nobody/1", "--source-tracking-uri", t["store"],
                   "--arch", ARCH],
     "models:/nobody/1 does not resolve"),
    ("mlflow-store-that-does-not-exist",
     lambda t, f: ["--from-mlflow", "models:/their-model/1", "--source-tracking-uri",
                   f"sqlite:///{f / 'none.db'}", "--arch", ARCH],
     "does not exist"),
    ("no-source",
     lambda t, f: ["--arch", ARCH],
     "exactly one source"),
    ("preprocessing-file-with-an-unknown-key",
     lambda t, f: ["--arch", ARCH, "--weights", t["weights"], "--preprocessing",
                   _json_file(f / "pre.json", {"size": 12})],
     "expected a JSON object with keys among channels, classes, image_size, mean, std"),
    ("std-of-zero",
     lambda t, f: ["--arch", ARCH, "--weights", t["weights"], "--std", "0"],
     "std must be positive"),
]


def _json_file(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("argv, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_registers_nothing(argv, message, team, home, prefect_server,
                                                     capfd, tmp_path):
    capfd.readouterr()
    rc, out, err = cli("adopt", *argv(team, tmp_path))
    err += capfd.readouterr().err  # the CLI's own lines, and anything else on fd 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in out + err
    assert not (home.mlruns / "mlflow.db").exists()  # no registry, no experiment, no run
    assert not (home.data / "base").exists() and not (home.artifacts / "adopt").exists()


def test_timm_without_timm_says_how_to_install_it(team, home, prefect_server):
    import importlib.util

    rc, _out, err = cli("adopt", "--arch", "timm:resnet18", "--weights", team["weights"])
    if importlib.util.find_spec("timm") is None:
        assert rc == 2 and "pip install timm" in err, err
    else:  # installed: the architecture resolves, and these weights do not fit it
        assert rc == 2 and "do not fit timm:resnet18" in err, err


def test_a_gpu_that_is_not_there_is_one_line(home, write_params, capfd):
    """``runtime.device: cuda`` (or ``bench --device cuda``) on a machine without one."""
    write_params(home.home, runtime={"device": "cuda"})
    capfd.readouterr()
    rc, _out, err = cli("pretrain")
    bench_rc, _out, bench_err = cli("bench", "--serial", "--device", "cuda", "--k", "1")
    err += bench_err + capfd.readouterr().err
    if torch.cuda.is_available():  # then it is there: the same settings resolve to it
        from unlearning.devices import resolve_device

        assert resolve_device("cuda").type == "cuda"
    else:
        assert rc == 2 and bench_rc == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 2 and all("sees no GPU" in line for line in lines), err
        assert not (home.mlruns / "mlflow.db").exists()
