"""Checkpoint format 1 (capsctl 0.1, one flat model/loss/data bag) read by this release: the
committed fixtures (tests/fixtures/format1, made by make.py with 0.1.0) load as format 2 and give
exactly the numbers 0.1.0 measured; every renamed key lands where it belongs; the inspection
commands run on a migrated checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from capsctl import checkpoint
from capsctl.cli import app
from capsctl.config import from_dict, load, to_dict
from capsctl.data.build import build_eval
from capsctl.errors import ConfigError
from capsctl.fields import field_names
from capsctl.migrate import config_v1_to_v2
from capsctl.models.registry import MODELS
from capsctl.models.routing import FLAT_KEYS
from conftest import REPO, cpu_kind, write_fake_mnist

FIXTURES = REPO / "tests" / "fixtures" / "format1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
CPU = torch.device("cpu")
runner = CliRunner()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The synthetic MNIST make.py evaluated on (write_fake_mnist's defaults)."""
    return write_fake_mnist(tmp_path_factory.mktemp("format1") / "mnist")


@pytest.fixture
def one_thread():
    """make.py ran with one thread; the score sums are compared to 1e-9."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_fixture_has_expected_numbers():
    assert sorted(EXPECTED) == sorted(p.name for p in FIXTURES.glob("*.pt"))


# --- the fixtures -------------------------------------------------------------------------

FIXTURE_KEYS = {  # what make.py set (tiny widths), as format-2 keys
    "capsnet-best.pt": ("capsnet", {"conv1_channels": 8, "primary_types": 2, "primary_dim": 4,
                                    "class_dim": 6, "decoder_hidden": [16, 32],
                                    "transform_init_std": 0.1}, {}),
    "capsnet-last.pt": ("capsnet", {"conv1_channels": 8, "transform_init_std": 0.1}, {}),
    "em-best.pt": ("em-capsnet", {"conv1_channels": 4, "primary_types": 2, "caps1_types": 2,
                                  "caps2_types": 2, "iterations": 2, "decoder": False},
                   {"m_steps": 10, "m_start": 0.2, "m_end": 0.9}),
    "cnn-best.pt": ("cnn", {"channels": [4, 4], "hidden": [8], "pool": [2, 2]}, {}),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_KEYS))
def test_fixture_loads_as_format_2_with_a_valid_config(name):
    raw = torch.load(FIXTURES / name, weights_only=True)
    assert raw["format_version"] == 1 and "dataset" in raw["config"]["data"]
    state = checkpoint.load(FIXTURES / name)
    assert state["format_version"] == checkpoint.FORMAT_VERSION == 2
    cfg = checkpoint.config_of(state, FIXTURES / name)
    family, model_keys, loss_keys = FIXTURE_KEYS[name]
    assert cfg.model.name == family and cfg.data.name == "mnist"
    assert set(state["config"]["model"]) <= set(format_2_keys(family))
    for key, value in model_keys.items():
        assert getattr(cfg.model, key) == value, key
    for key, value in loss_keys.items():
        assert getattr(cfg.loss, key) == value, key
    assert (cfg.data.val_size, cfg.train.batch_size) == (32, 16)
    assert from_dict(to_dict(cfg)) == cfg
    # the weights are untouched by the migration and fit the migrated config's model
    assert all(torch.equal(raw["model"][k], state["model"][k]) for k in raw["model"])
    assert raw["step"] == state["step"] == EXPECTED[name]["step"]
    checkpoint.check_weights(cfg.model, state["model"], name)


def test_fixture_file_is_left_as_format_1():
    before = (FIXTURES / "em-best.pt").read_bytes()
    checkpoint.load(FIXTURES / "em-best.pt")
    assert (FIXTURES / "em-best.pt").read_bytes() == before


def test_eval_gives_the_numbers_of_the_release_that_wrote_them(data_root):
    names = sorted(EXPECTED)
    r = runner.invoke(app, ["eval", *[str(FIXTURES / n) for n in names], "--data-root",
                            str(data_root), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)["results"]
    assert [res["checkpoint"] for res in results] == [str(FIXTURES / n) for n in names]
    for name, res in zip(names, results):
        want = EXPECTED[name]
        assert res["dataset"] == "mnist" and res["split"] == "test"
        assert (res["accuracy"], res["n"], res["step"]) == (want["accuracy"], want["n"],
                                                           want["step"]), name
        assert res["model"] == FIXTURE_KEYS[name][0]


def recorded_scores(entry: dict) -> tuple[dict, float]:
    """The score sums recorded for this kind of CPU and the tolerance: 1e-9 where the fixture's
    maker ran on this kind of CPU (fp32 sums of the same code agree to the last bits there),
    1e-6 elsewhere (oneDNN's other kernels round the last bits differently)."""
    if cpu_kind() in entry.get("by_cpu", {}):
        return entry["by_cpu"][cpu_kind()], 1e-9
    made_on = entry.get("made_with", {}).get("cpu", "GenuineIntel family 6")
    return entry, 1e-9 if made_on == cpu_kind() else 1e-6


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_class_scores_match_to_1e_9(name, data_root, one_thread):
    model, cfg, _ = checkpoint.load_model(FIXTURES / name, CPU)
    source = build_eval(cfg.data.name, "test", cfg, CPU, str(data_root))
    test_x = torch.cat([b["x"] for b in source.batches(1000)])
    assert test_x.shape == (EXPECTED[name]["n"], 1, 28, 28)
    with torch.no_grad():
        scores = model(test_x)["scores"].double()
    want, rtol = recorded_scores(EXPECTED[name])
    for key, got in (("scores_sum", scores.sum()), ("scores_sq_sum", scores.pow(2).sum())):
        assert abs(float(got) - want[key]) <= rtol * abs(want[key]), (name, key, float(got))


@pytest.mark.parametrize("command,extra", [
    ("reconstruct", ["--n", "2"]),
    ("perturb", ["--index", "3"]),
    ("routes", ["--index", "3"]),
])
def test_inspection_commands_on_a_format_1_checkpoint(tmp_path, data_root, command, extra):
    out = tmp_path / f"{command}.png"
    r = runner.invoke(app, [command, str(FIXTURES / "capsnet-best.pt"), "--out", str(out),
                            "--data-root", str(data_root), "--device", "cpu", "--no-tb",
                            *extra])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# --- the key map, family by family --------------------------------------------------------

# capsctl 0.1's resolved config (every key of every family), each value changed from its
# default; the fixtures hold the same keys in the same order (checked below)
V1 = {
    "model": {"name": "capsnet", "input_size": 28, "in_channels": 1, "num_classes": 10,
              "conv1_channels": 7, "conv1_kernel": 5, "primary_types": 3, "primary_dim": 4,
              "primary_kernel": 5, "primary_stride": 1, "class_dim": 6,
              "routing_iterations": 2, "transform_init_std": 0.05, "primary_scale": 0.5,
              "class_bias": True, "decoder": False, "decoder_hidden": [12, 24],
              "dropout": 0.25, "cnn_channels": [5, 6], "cnn_hidden": [9], "cnn_pool": [2, 1],
              "em_conv1_channels": 11, "em_primary_types": 12, "em_caps1_types": 13,
              "em_caps2_types": 14, "em_iterations": 2, "em_lambda": 0.02,
              "em_lambda_rate": 0.9, "em_var_floor": 0.001, "em_init_std": 0.25,
              "em_coordinate_addition": False},
    "loss": {"m_plus": 0.85, "m_minus": 0.15, "down_weight": 0.4, "recon_weight": 0.001,
             "spread_m_start": 0.3, "spread_m_end": 0.8, "spread_m_steps": 77},
    "data": {"dataset": "mnist", "root": "/data/x", "download": True, "val_size": 100,
             "shift": 1, "multimnist_shift": 3, "multimnist_pad": 5, "multimnist_per_digit": 7,
             "multimnist_val_per_digit": 3, "multimnist_test_limit": 500, "multimnist_seed": 9},
    "optim": {"lr": 0.002, "beta1": 0.8, "beta2": 0.99, "eps": 1e-7, "weight_decay": 0.01,
              "lr_decay": 0.9, "lr_decay_steps": 100, "min_lr": 1e-5},
    "train": {"epochs": 3, "max_steps": 40, "batch_size": 16, "eval_batch_size": 32,
              "seed": 5, "device": "cpu", "precision": "bf16", "compile": True, "log_every": 3,
              "checkpoint_every": 7, "checkpoint_minutes": 2.5, "images_every_epoch": False,
              "nonfinite": "skip", "target_val_accuracy": 0.5, "final_eval": ["affnist"]},
}
FILES = {"root": "/data/x", "download": True, "val_size": 100}

def format_2_keys(family: str) -> list[str]:
    """The model keys of format 2: the family's fields, and capsnet's flat routing keys (the
    loader moves them into model.routing)."""
    flat = [k for k in FLAT_KEYS if family == "capsnet"]
    return [k for k in field_names(MODELS[family].config) if k != "routing" or not flat] + \
        (["routing", *flat] if flat else [])


def as_loaded(family: str, model: dict) -> dict:
    """A format-2 model section as the loader makes it: capsnet's routing keys nested."""
    if family != "capsnet":
        return model
    routing = {"name": model["routing"],
               **{FLAT_KEYS[k][0]: v for k, v in model.items() if k in FLAT_KEYS}}
    return {**{k: v for k, v in model.items() if k not in FLAT_KEYS}, "routing": routing}


# keys a family gained after format 1, with the default that does what 0.1 did: a migrated
# checkpoint takes these (a key added to a format-1 family must be listed here)
ADDED_SINCE_FORMAT_1 = {"capsnet": {"routing": "dynamic", "leaky_routing": False},
                        "cnn": {"decoder": False, "decoder_hidden": [512, 1024]}}
LOSS_ADDED_SINCE_FORMAT_1 = {"cnn": {"recon_weight": 0.0005}}   # unused without a decoder
DATA_ADDED_SINCE_FORMAT_1 = {"mnist": {"augment": "shift"}}

# (family, dataset, (input_size, in_channels, num_classes)) -> the format-2 sections
CASES = {
    ("capsnet", "mnist", (28, 1, 10)): {
        "model": {"conv1_channels": 7, "conv1_kernel": 5, "primary_types": 3, "primary_dim": 4,
                  "primary_kernel": 5, "primary_stride": 1, "class_dim": 6,
                  "routing_iterations": 2, "transform_init_std": 0.05, "primary_scale": 0.5,
                  "class_bias": True, "decoder": False, "decoder_hidden": [12, 24]},
        "loss": {"m_plus": 0.85, "m_minus": 0.15, "down_weight": 0.4, "recon_weight": 0.001},
        "data": {**FILES, "shift": 1}},
    ("em-capsnet", "smallnorb", (32, 2, 5)): {
        "model": {"conv1_channels": 11, "primary_types": 12, "caps1_types": 13,
                  "caps2_types": 14, "iterations": 2, "inverse_temperature": 0.02,
                  "inverse_temperature_rate": 0.9, "var_floor": 0.001, "init_std": 0.25,
                  "coordinate_addition": False, "decoder": False, "decoder_hidden": [12, 24]},
        "loss": {"m_start": 0.3, "m_end": 0.8, "m_steps": 77, "recon_weight": 0.001},
        "data": dict(FILES)},                             # smallNORB never took data.shift
    ("cnn", "expanded-mnist", (40, 1, 10)): {
        "model": {"channels": [5, 6], "hidden": [9], "pool": [2, 1], "dropout": 0.25},
        "loss": {},
        "data": {**FILES, "shift": 1}},                   # expanded MNIST's offset
    ("multimnist-cnn", "multimnist", (38, 1, 10)): {
        "model": {"channels": [5, 6], "hidden": [9], "dropout": 0.25},
        "loss": {},
        "data": {**FILES, "shift": 3, "pad": 5, "per_digit": 7, "val_per_digit": 3,
                 "test_limit": 500, "seed": 9}},          # MNIST's data.shift did not apply
}


def v1_config(family: str, dataset: str, dims: tuple[int, int, int], reverse=False) -> dict:
    old = copy.deepcopy(V1)
    old["model"].update(name=family, input_size=dims[0], in_channels=dims[1],
                        num_classes=dims[2])
    old["data"]["dataset"] = dataset
    if reverse:  # a hand-written format-1 file may list keys in any order
        old = {s: dict(reversed(list(v.items()))) for s, v in old.items()}
    return old


def test_the_format_1_keys_are_those_of_the_fixtures():
    for name in EXPECTED:
        stored = torch.load(FIXTURES / name, weights_only=True)["config"]
        assert {s: list(v) for s, v in stored.items()} == {s: list(v) for s, v in V1.items()}


@pytest.mark.parametrize("case", list(CASES), ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("reverse", [False, True], ids=["stored-order", "reversed-order"])
def test_every_renamed_key_lands_where_it_belongs(case, reverse):
    family, dataset, dims = case
    want = CASES[case]
    old = v1_config(family, dataset, dims, reverse)
    before = copy.deepcopy(old)
    new = config_v1_to_v2(old)
    assert old == before                                  # the input is not changed
    model = {"name": family, "input_size": dims[0], "in_channels": dims[1],
             "num_classes": dims[2], **want["model"]}
    assert new["model"] == model
    assert new["loss"] == want["loss"]
    assert new["data"] == {"name": dataset, **want["data"]}
    assert new["optim"] == V1["optim"] and new["train"] == V1["train"]
    assert list(new) == list(old)
    # every key of the family and dataset is carried over (none left at a default), but for
    # the keys the family gained since
    cfg = from_dict(new, source="migrated")
    added = ADDED_SINCE_FORMAT_1.get(family, {})
    assert to_dict(cfg)["model"] == as_loaded(family, {**model, **added})
    assert set(model) | set(added) == set(format_2_keys(family))
    assert to_dict(cfg)["loss"] == {**want["loss"], **LOSS_ADDED_SINCE_FORMAT_1.get(family, {})}
    assert to_dict(cfg)["data"] == {"name": dataset, **want["data"],
                                    **DATA_ADDED_SINCE_FORMAT_1.get(dataset, {})}
    assert to_dict(cfg)["optim"] == V1["optim"] and to_dict(cfg)["train"] == V1["train"]
    assert from_dict(to_dict(cfg)) == cfg                 # and it round-trips


def test_cases_cover_every_format_1_family_and_dataset():
    assert {family for family, _, _ in CASES} == {"capsnet", "em-capsnet", "cnn",
                                                  "multimnist-cnn"} <= set(MODELS)
    assert {dataset for _, dataset, _ in CASES} == {"mnist", "smallnorb", "expanded-mnist",
                                                    "multimnist"}


def test_what_is_not_format_1_is_passed_to_the_loader():
    for odd in ([1], "text", None, {"model": [1]}, {"data": "x"}):
        assert config_v1_to_v2(odd) == odd
    for doc in ({"model": {"name": "nope"}, "data": {"dataset": "mnist"}},
                {"model": {"name": ["capsnet"]}, "data": {"dataset": "mnist"}},
                {"model": {"name": "capsnet"}, "data": {"dataset": {"mnist": 1}}},
                {"model": {"name": "capsnet"}, "data": {"dataset": "affnist"}},
                {"model": {"name": "capsnet"}, "data": {"dataset": "nope"}}):
        assert config_v1_to_v2(doc) == doc
        with pytest.raises(ConfigError):
            from_dict(config_v1_to_v2(doc))


# --- the example configs against the previous release's --------------------------------

RELEASE = "079bd4f"  # capsctl 0.1.0, the last release with format-1 configs


# configs/*.yaml of capsctl 0.1.0 (commit 079bd4f), format 1, copied as they were
OLD_DIR = REPO / "tests" / "fixtures" / "format1" / "configs"
OLD_CONFIGS = sorted(p.name for p in OLD_DIR.glob("*.yaml"))


def test_every_config_of_the_previous_release_is_still_here():
    assert len(OLD_CONFIGS) >= 10
    assert [n for n in OLD_CONFIGS if not (REPO / "configs" / n).is_file()] == []


@pytest.mark.parametrize("name", OLD_CONFIGS)
def test_example_config_is_the_migration_of_the_previous_one(name):
    """configs/NAME.yaml says what 0.1.0's configs/NAME.yaml said, in the new keys."""
    old = yaml.safe_load((OLD_DIR / name).read_text())
    assert "dataset" in old["data"]                       # really a format-1 file
    new = load(REPO / "configs" / name)
    assert from_dict(config_v1_to_v2(old), source=f"{RELEASE}:{name}") == new


# --- format 2: capsnet's flat routing keys ---------------------------------------------------

FORMAT_2 = REPO / "tests" / "fixtures" / "format2"
EXPECTED_2 = json.loads((FORMAT_2 / "expected.json").read_text())
ROUTING_2 = {  # what make.py set, as the model.routing section it loads into
    "dynamic.pt": {"name": "dynamic", "iterations": 2, "class_bias": True, "leaky": False},
    "leaky.pt": {"name": "dynamic", "iterations": 3, "class_bias": False, "leaky": True},
    "inverted.pt": {"name": "inverted-dot-product", "iterations": 2},
}


def test_every_format_2_fixture_has_expected_numbers():
    assert sorted(EXPECTED_2) == sorted(ROUTING_2) == sorted(p.name for p in
                                                             FORMAT_2.glob("*.pt"))


@pytest.mark.parametrize("name", sorted(ROUTING_2))
def test_format_2_flat_routing_keys_load_into_model_routing(name):
    raw = torch.load(FORMAT_2 / name, weights_only=True)
    flat = raw["config"]["model"]
    assert raw["format_version"] == 2 and isinstance(flat["routing"], str)
    assert {"routing_iterations", "class_bias", "leaky_routing"} <= set(flat)
    model, cfg, _ = checkpoint.load_model(FORMAT_2 / name, CPU)
    assert to_dict(cfg)["model"]["routing"] == ROUTING_2[name]
    assert not {"routing_iterations", "class_bias", "leaky_routing"} & set(to_dict(cfg)["model"])
    assert from_dict(to_dict(cfg)) == cfg
    assert all(torch.equal(raw["model"][k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(ROUTING_2))
def test_format_2_fixture_scores_as_recorded(name, data_root, one_thread):
    """The accuracy exactly and the class scores' sums to 1e-9, as the commit that wrote them
    (tests/fixtures/format2/make.py)."""
    r = runner.invoke(app, ["eval", str(FORMAT_2 / name), "--data-root", str(data_root),
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)                               # one checkpoint: one object
    want = EXPECTED_2[name]
    assert (res["accuracy"], res["n"], res["step"]) == (want["accuracy"], want["n"],
                                                       want["step"])
    model, cfg, _ = checkpoint.load_model(FORMAT_2 / name, CPU)
    source = build_eval(cfg.data.name, "test", cfg, CPU, str(data_root))
    test_x = torch.cat([b["x"] for b in source.batches(1000)])
    with torch.no_grad():
        scores = model(test_x)["scores"].double()
    want, rtol = recorded_scores(want)
    for key, got in (("scores_sum", scores.sum()), ("scores_sq_sum", scores.pow(2).sum())):
        assert abs(float(got) - want[key]) <= rtol * abs(want[key]), (name, key, float(got))


def test_a_run_folder_of_format_2_holds_the_same_config():
    """A run folder's config.yaml written before model.routing had its own keys is a run of the
    same config (a sweep over it continues), and a changed flat key still differs."""
    from capsctl.migrate import nest_routing
    from capsctl.runfolder import config_differences

    cfg = from_dict({"model": {"routing": {"name": "uniform", "class_bias": True}}})
    stored = to_dict(cfg)
    flat = {**{k: v for k, v in stored["model"].items() if k != "routing"},
            "routing": "uniform", "routing_iterations": 3, "class_bias": True,
            "leaky_routing": False}
    assert nest_routing(flat) == stored["model"]
    assert config_differences({**stored, "model": flat}, cfg) == []
    differ = config_differences({**stored, "model": {**flat, "class_bias": False}}, cfg)
    assert len(differ) == 1 and differ[0].startswith("model.routing (")
    for other in ({"name": "cnn", "class_bias": 1}, {"routing": "nope"}, [1]):
        assert nest_routing(other) == other                 # left to the loader's message


def test_a_format_1_cnn_stays_without_a_decoder():
    """Format 1's flat bag held CapsNet's decoder: true for every family; the CNN gained a
    decoder of its own later, and a 0.1 CNN must not be read as having one."""
    old = v1_config("cnn", "mnist", (28, 1, 10))
    old["model"].update(decoder=True, decoder_hidden=[64, 128])
    cfg = from_dict(config_v1_to_v2(old), source="migrated")
    assert cfg.model.decoder is False and cfg.model.decoder_hidden == [512, 1024]
