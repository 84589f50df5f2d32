"""The model and dataset registries: a key of another model family or dataset is refused with
one line (naming the chosen family and the key's owner) and exit 2, for every pair; every family
builds from its defaults and honours the model contract (capsctl/models/contract.py); a dataset
the model does not fit is one line."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from capsctl import config as C
from capsctl.cli import app
from capsctl import tasks
from capsctl.data.registry import DATASETS, TRAINING
from capsctl.errors import ConfigError
from capsctl.fields import default_of, field_names
from capsctl.models import build_model, count_parameters, loss_fn
from capsctl.models.registry import MODELS
from conftest import REPO

runner = CliRunner()

# a dataset each family can learn, so that the only fault of a config is the key under test
HOME = {name: next(d for d in TRAINING if DATASETS[d].task in spec.losses)
        for name, spec in MODELS.items()}
SECTION_CLASS = {"model": lambda n: MODELS[n].config, "loss": lambda n: MODELS[n].loss_config,
                 "data": lambda n: DATASETS[n].options}


def _default(cls: type, key: str):
    value = default_of({f.name: f for f in dataclasses.fields(cls)}[key])
    return value.name if dataclasses.is_dataclass(value) else value  # model.routing: its name


def foreign_keys(section: str) -> list[tuple[str, str, str, object]]:
    """(A, B, key, value): every key of B's ``section`` class that A's lacks, for every ordered
    pair of model families (model, loss) or training datasets (data); value = B's default."""
    names = list(TRAINING) if section == "data" else list(MODELS)
    cases = []
    for a, b in itertools.permutations(names, 2):
        cls_a, cls_b = SECTION_CLASS[section](a), SECTION_CLASS[section](b)
        for key in field_names(cls_b):
            if key not in field_names(cls_a):
                cases.append((a, b, key, _default(cls_b, key)))
    return cases


CASES = {s: foreign_keys(s) for s in ("model", "loss", "data")}
ALL_CASES = [(s, *c) for s, cases in CASES.items() for c in cases]


def doc_for(section: str, a: str, key: str, value) -> dict:
    """A config of family (or dataset) ``a`` that is valid but for ``section.key``."""
    if section == "data":
        return {"model": {"name": "capsnet"}, "data": {"name": a, key: value}}
    if section == "model":
        return {"model": {"name": a, key: value}, "data": {"name": HOME[a]}}
    return {"model": {"name": a}, "data": {"name": HOME[a]}, "loss": {key: value}}


def owner_words(section: str, a: str) -> str:
    return {"model": f"model family {a}", "loss": f"model family {a}'s loss",
            "data": f"dataset {a}"}[section]


def check_message(msg: str, section: str, a: str, b: str, key: str) -> None:
    assert "\n" not in msg
    assert f"config key '{section}.{key}' is not an option of {owner_words(section, a)} " in msg
    belongs = msg.split("(it belongs to ", 1)[1].split(")", 1)[0].split(", ")
    assert b in belongs and a not in belongs, msg


def as_yaml_scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def test_every_pair_has_foreign_keys():
    """The table is not empty by accident: each section has cases, and every family and dataset
    meets keys of every other one that has any of its own."""
    assert len(CASES["model"]) > 30 and len(CASES["loss"]) > 5 and len(CASES["data"]) > 10
    pairs = {(a, b) for a, b, _, _ in CASES["model"]}
    assert {a for a, _ in pairs} == {b for _, b in pairs} == set(MODELS)
    assert ("multimnist-cnn", "cnn") in pairs and ("cnn", "multimnist-cnn") not in pairs
    assert {(a, b) for a, b, _, _ in CASES["data"]} >= {("smallnorb", "mnist"),
                                                         ("mnist", "multimnist")}
    assert ("cnn", "capsnet", "m_plus", 0.9) in CASES["loss"]
    assert ("capsnet", "em-capsnet", "m_start", 0.2) in CASES["loss"]


@pytest.mark.parametrize("section", ["model", "loss", "data"])
def test_foreign_key_is_refused_by_from_dict_load_and_set(section, tmp_path):
    for a, b, key, value in CASES[section]:
        doc = doc_for(section, a, key, value)
        with pytest.raises(ConfigError) as e:
            C.from_dict(doc, source="x.yaml")
        check_message(str(e.value), section, a, b, key)
        assert str(e.value).startswith("x.yaml: ")
        # the same through a YAML file
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError) as e:
            C.load(path)
        check_message(str(e.value), section, a, b, key)
        assert str(e.value).startswith(f"{path}: ")
        # and through --set (the family / dataset picked by --set as well)
        picks = [f"model.name={doc['model']['name']}", f"data.name={doc['data']['name']}"]
        with pytest.raises(ConfigError) as e:
            C.load(None, [*picks, f"{section}.{key}={as_yaml_scalar(value)}"])
        check_message(str(e.value), section, a, b, key)
        # and on a built config
        cfg = C.from_dict({"model": {"name": doc["model"]["name"]},
                           "data": {"name": doc["data"]["name"]}})
        with pytest.raises(ConfigError) as e:
            C.set_key(cfg, f"{section}.{key}", value)
        check_message(str(e.value), section, a, b, key)


@pytest.mark.parametrize("section", ["model", "loss", "data"])
def test_foreign_key_through_the_cli_is_one_line_and_exit_2(section):
    """Every case through ``capsctl config --set`` in process (CliRunner)."""
    for a, b, key, value in CASES[section]:
        doc = doc_for(section, a, key, value)
        args = ["config", "--set", f"model.name={doc['model']['name']}",
                "--set", f"data.name={doc['data']['name']}",
                "--set", f"{section}.{key}={as_yaml_scalar(value)}"]
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        check_message(lines[0], section, a, b, key)


def run_config_file(tmp_path, doc) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return subprocess.run([sys.executable, "-m", "capsctl", "config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("section,case", [
    ("model", ("cnn", "capsnet", "routing", "dynamic")),
    ("model", ("capsnet", "em-capsnet", "inverse_temperature", 0.01)),
    ("loss", ("em-capsnet", "capsnet", "m_plus", 0.9)),
    ("loss", ("multimnist-cnn", "em-capsnet", "m_steps", 10000)),
    ("data", ("mnist", "multimnist", "pad", 4)),
    ("data", ("smallnorb", "mnist", "shift", 2)),
])
def test_foreign_key_in_a_file_through_the_installed_command(tmp_path, section, case):
    """``python -m capsctl config FILE``: exit code 2 and one line on stderr."""
    a, b, key, value = case
    assert case in CASES[section]
    line = one_error_line(run_config_file(tmp_path, doc_for(section, a, key, value)))
    check_message(line, section, a, b, key)
    assert str(tmp_path / "c.yaml") in line


# --- model against dataset ----------------------------------------------------------------

MISMATCHES = [
    ({"model": {"name": "capsnet", "input_size": 40}, "data": {"name": "mnist"}},
     "dataset mnist makes 28x28 images but model.input_size is 40; set model.input_size=28"),
    ({"model": {"name": "em-capsnet", "input_size": 28}, "data": {"name": "smallnorb"}},
     "dataset smallnorb makes 32x32 images but model.input_size is 28"),
    ({"model": {"name": "capsnet", "input_size": 36}, "data": {"name": "multimnist", "pad": 6}},
     "dataset multimnist makes 40x40 images but model.input_size is 36"),
    ({"model": {"name": "cnn", "in_channels": 3}, "data": {"name": "mnist"}},
     "dataset mnist gives 1 channel(s) but model.in_channels is 3"),
    ({"model": {"name": "em-capsnet", "in_channels": 3}, "data": {"name": "smallnorb"}},
     "dataset smallnorb gives 1 or 2 channel(s) but model.in_channels is 3"),
    ({"model": {"name": "capsnet", "num_classes": 5}, "data": {"name": "expanded-mnist"}},
     "dataset expanded-mnist has 10 classes but model.num_classes is 5; set "
     "model.num_classes=10"),
    ({"model": {"name": "em-capsnet", "num_classes": 10}, "data": {"name": "smallnorb"}},
     "dataset smallnorb has 5 classes but model.num_classes is 10"),
    ({"model": {"name": "cnn"}, "data": {"name": "multimnist"}},
     "model family cnn cannot learn dataset multimnist (a two-label task); use capsnet or "
     "multimnist-cnn"),
    ({"model": {"name": "em-capsnet"}, "data": {"name": "multimnist"}},
     "model family em-capsnet cannot learn dataset multimnist (a two-label task)"),
    ({"model": {"name": "multimnist-cnn"}, "data": {"name": "mnist"}},
     "model family multimnist-cnn cannot learn dataset mnist (a one-label task); use capsnet or "
     "em-capsnet or cnn"),
]


@pytest.mark.parametrize("doc,needle", MISMATCHES)
def test_dataset_model_mismatch_is_one_line(doc, needle):
    with pytest.raises(ConfigError) as e:
        C.from_dict(doc, source="m.yaml")
    assert str(e.value).startswith("m.yaml: ") and needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("doc,needle", [MISMATCHES[0], MISMATCHES[3], MISMATCHES[5],
                                        MISMATCHES[7]])
def test_dataset_model_mismatch_through_the_installed_command(tmp_path, doc, needle):
    assert needle in one_error_line(run_config_file(tmp_path, doc))


def test_every_family_learns_only_its_task_kinds():
    for name, spec in MODELS.items():
        assert set(spec.losses) <= set(tasks.kinds()) and spec.losses
        for d in TRAINING:
            doc = {"model": {"name": name}, "data": {"name": d}}
            if DATASETS[d].task in spec.losses:
                cfg = C.from_dict(doc)          # model dimensions follow the dataset
                assert (cfg.model.name, cfg.data.name) == (name, d)
                ds = DATASETS[d]
                assert cfg.model.input_size == ds.side(cfg.data)
                names = ds.class_names(cfg.data)
                assert cfg.model.num_classes == (len(names) if names is not None else None)
                assert cfg.model.in_channels == ds.channel_counts(cfg.data)[0]
            else:
                with pytest.raises(ConfigError, match=f"cannot learn dataset {d}"):
                    C.from_dict(doc)


# --- every family builds and honours the contract -----------------------------------------

TINY = {"capsnet": {"conv1_channels": 8, "primary_types": 2, "primary_dim": 4, "class_dim": 6,
                    "decoder_hidden": [16, 32]},
        "em-capsnet": {"conv1_channels": 8, "primary_types": 4, "caps1_types": 3,
                       "caps2_types": 3, "iterations": 2, "decoder_hidden": [8]},
        "cnn": {"channels": [4, 6], "hidden": [12, 8], "pool": [2, 1]},
        "multimnist-cnn": {"channels": [4, 4], "hidden": [8]},
        "efficient-capsnet": {"conv_channels": [4, 8], "conv_kernels": [5, 3],
                              "conv_strides": [1, 2], "primary_dim": 4, "class_dim": 6,
                              "decoder_hidden": [16]}}
LEARNABLE = [(m, d) for m, spec in MODELS.items() for d in TRAINING
             if DATASETS[d].task in spec.losses]


def test_tiny_widths_cover_every_family():
    assert set(TINY) == set(MODELS)


@pytest.mark.parametrize("name", list(MODELS))
def test_defaults_build_a_model(name):
    """The family's defaults on its first dataset build (on the meta device: no memory)."""
    cfg = C.empty(name, HOME[name])
    C.validate(cfg)
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert type(model).__name__ == MODELS[name].module.split(":")[1]
    assert count_parameters(model) > 100_000


def fake_batch(task: str, side: int, channels: int, classes: int, b: int = 3) -> dict:
    """A batch of the task kind (its synthetic batch, ``capsctl bench``'s)."""
    g = torch.Generator().manual_seed(0)
    return tasks.get(task).synthetic_batch((b, channels, side, side), classes, g)


@pytest.mark.parametrize("name,dataset", LEARNABLE)
def test_family_honours_the_contract(name, dataset):
    torch.manual_seed(0)
    spec = DATASETS[dataset]
    # a dataset whose classes are its files' (folder) has none until its root is known
    known = spec.class_names(spec.options(name=dataset)) is not None
    classes = {} if known else {"num_classes": 3}
    cfg = C.from_dict({"model": {"name": name, **TINY[name], **classes},
                       "data": {"name": dataset}})
    m, task = cfg.model, DATASETS[dataset].task
    model = build_model(m)
    key, layout, label = model.capsule_key, model.routing_layout, model.routing_label
    assert key in ("v", "pose", None)
    assert isinstance(model.has_decoder, bool)
    assert model.has_decoder == ("decoder" in field_names(type(m)) and m.decoder)
    assert (layout is None) == (label is None) == (key is None)
    batch = fake_batch(task, m.input_size, m.in_channels, m.num_classes)
    B, J = batch["y"].shape[0], m.num_classes
    N = m.in_channels * m.input_size ** 2
    model.eval()
    with torch.no_grad():
        out = model(batch["x"], keep_routing=True)
    assert out["scores"].shape == (B, J) and out["scores"].dtype == torch.float32
    expected = {"scores"} | ({key} if key else set())
    expected |= {"recon"} if model.has_decoder else set()
    expected |= {"routing"} if layout else set()
    expected |= {"logits"} if name == "multimnist-cnn" else set()
    assert set(out) == expected, set(out)
    if key:
        assert out[key].shape[:2] == (B, J)
        assert out[key].shape[2] == (16 if key == "pose" else m.class_dim)
    if layout is not None:
        types, h, w = layout
        assert isinstance(label, str) and label
        assert out["routing"] and all(r.shape == (B, types * h * w, J) for r in out["routing"])
        assert all(torch.allclose(r.sum(-1), torch.ones(B, types * h * w), atol=1e-4)
                   for r in out["routing"])
    if model.has_decoder:
        pred = out["scores"].argmax(1)
        assert out["recon"].shape == (B, N)
        with torch.no_grad():
            assert torch.allclose(model.decode(out[key], pred), out["recon"], atol=1e-6)
            other = model.decode(out[key], (pred + 1) % J)
            pair = model.decode(out[key], torch.stack([pred, (pred + 1) % J], 1))
        assert pair.shape == (B, 2, N)
        assert torch.allclose(pair[:, 0], out["recon"], atol=1e-6)
        assert torch.allclose(pair[:, 1], other, atol=1e-6)
    with torch.no_grad():
        assert "routing" not in model(batch["x"])
    # the loss of the family for this task: named scalar terms including a finite total
    model.train()
    labels = tasks.get(task).model_labels(batch)
    out = model(batch["x"], labels)
    if model.has_decoder and labels.dim() == 2:      # one reconstruction per label
        assert out["recon"].shape == (B, 2, N)
    terms = loss_fn(cfg, task)(out, batch, 0)
    assert "total" in terms and all(t.dim() == 0 for t in terms.values())
    assert torch.isfinite(terms["total"])
    terms["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_no_family_without_a_contract_test():
    assert {m for m, _ in LEARNABLE} == set(MODELS)
    assert {d for _, d in LEARNABLE} == set(TRAINING)
