"""Config precedence (defaults < YAML < --set) and one-line errors naming the key."""

from __future__ import annotations

import pytest

from capsctl import config as C
from capsctl.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_set(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: 64\n  epochs: 3\noptim:\n  lr: 0.01\n")
    cfg = C.load(p, ["train.epochs=5", "model.decoder_hidden=[8, 16]"])
    assert cfg.train.batch_size == 64          # YAML over default
    assert cfg.train.epochs == 5               # --set over YAML
    assert cfg.optim.lr == 0.01
    assert cfg.model.decoder_hidden == [8, 16]
    assert cfg.model.conv1_channels == 256     # default


def test_paper_config_is_the_paper(repo_configs=None):
    from pathlib import Path

    cfg = C.load(Path(__file__).parents[1] / "configs" / "mnist.yaml")
    m = cfg.model
    assert (m.conv1_channels, m.conv1_kernel, m.primary_types, m.primary_dim) == (256, 9, 32, 8)
    assert (m.primary_kernel, m.primary_stride, m.class_dim) == (9, 2, 16)
    assert (m.routing.name, m.routing.iterations, m.routing.class_bias) == ("dynamic", 3, False)
    assert m.decoder_hidden == [512, 1024]
    assert (cfg.loss.m_plus, cfg.loss.m_minus, cfg.loss.down_weight) == (0.9, 0.1, 0.5)
    assert cfg.loss.recon_weight == 0.0005
    o = cfg.optim
    assert (o.lr, o.lr_decay, o.lr_decay_steps, o.min_lr) == (1e-3, 0.96, 2000, 1e-6)
    assert cfg.train.batch_size == 128 and cfg.data.shift == 2


@pytest.mark.parametrize("text, needle", [
    ("train:\n  batch_sise: 3\n", "did you mean 'train.batch_size'"),
    ("trian:\n  epochs: 3\n", "did you mean 'train'"),
    ("train:\n  epochs: three\n", "'train.epochs' must be an integer"),
    ("train:\n  epochs: true\n", "'train.epochs' must be an integer"),
    ("optim:\n  lr: -0.1\n", "'optim.lr' must be > 0"),
    ("train:\n  batch_size: 0\n", "'train.batch_size' must be >= 1"),
    ("model:\n  routing:\n    iterations: 0\n", "'model.routing.iterations' must be >= 1"),
    ("model:\n  routing_iterations: 0\n", "'model.routing.iterations' must be >= 1"),
    ("model:\n  routing:\n    name: uniform\n    iterations: 2\n",
     "'model.routing.iterations' (formerly model.routing_iterations) is not an option of routing "
     "uniform (it belongs to dynamic, inverted-dot-product); uniform takes: class_bias"),
    ("data:\n  shift: -1\n", "'data.shift' must be >= 0"),
    ("train:\n  precision: fp8\n", "must be one of fp32, bf16"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("train: 3\n", "section 'train' must be a mapping"),
    ("train:\n  epochs: [1\n", "YAML syntax error at line"),
    ("model:\n  input_size: 12\n", "too small"),
    ("loss:\n  m_minus: 0.95\n", "must be below"),
    ("data:\n  dataset: mnist\n", "data.dataset is now data.name"),
    ("model:\n  name: capsnett\n", "did you mean 'capsnet'"),
    ("data:\n  name: affnist\n", "an evaluation-only dataset"),
    ("model:\n  name: em-capsnet\n  em_iterations: 2\n", "did you mean 'model.iterations'"),
    ("model:\n  name: cnn\n  routing: uniform\n", "(it belongs to capsnet)"),
])
def test_bad_yaml_names_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        C.load(write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        C.load(write(tmp_path, "# nothing\n"))
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=2", "did you mean 'train.epochs'"),
    ("epochs=2", "section.key"),
    ("train.epochs", "section.key=value"),
    ("train.lr=0.1", "unknown config key 'train.lr'"),
    ("optim.lr=abc", "must be a number"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError) as e:
        C.load(None, [override])
    assert needle in str(e.value)


def test_set_picks_the_family_and_dataset_first(tmp_path):
    """--set model.name / data.name choose the sections before the file's keys are read."""
    p = write(tmp_path, "model:\n  iterations: 2\nloss:\n  m_steps: 5\n")
    cfg = C.load(p, ["model.name=em-capsnet", "data.name=smallnorb", "model.input_size=32",
                     "model.num_classes=5"])
    assert cfg.model.name == "em-capsnet" and cfg.model.iterations == 2
    assert cfg.loss.m_steps == 5 and cfg.data.name == "smallnorb"
    with pytest.raises(ConfigError) as e:
        C.set_key(cfg, "model.name", "cnn")
    assert "'model.name' cannot change" in str(e.value)
    with pytest.raises(ConfigError) as e:
        C.set_key(cfg, "data.name", "mnist")
    assert "'data.name' cannot change" in str(e.value)


def test_set_values_are_yaml_scalars():
    cfg = C.load(None, ["train.compile=true", "optim.lr=1e-4", "data.root=null", "train.seed=7"])
    assert cfg.train.compile is True and cfg.optim.lr == 1e-4
    assert cfg.data.root is None and cfg.train.seed == 7


def test_round_trip_through_dict():
    cfg = C.load(None, ["train.epochs=4", "model.class_dim=12"])
    again = C.from_dict(C.to_dict(cfg))
    assert again == cfg


def test_reference_covers_every_key():
    """One table per model family, per family's loss, per training dataset, then optim and
    train; each lists exactly its dataclass's fields, in order, each with a meaning."""
    from capsctl.data.registry import DATASETS, TRAINING
    from capsctl.fields import field_names
    from capsctl.models.registry import MODELS

    from capsctl.models.routing import ROUTINGS

    expected = []
    for name, spec in MODELS.items():
        expected.append((f"model: {name}", "model", spec.config))
        if name == "capsnet":  # a table per routing: model.routing's keys
            expected += [(f"model.routing: {r}", "model.routing", s.options)
                         for r, s in ROUTINGS.items()]
        expected.append((f"loss: {name}", "loss", spec.loss_config))
    expected += [(f"data: {n}", "data", DATASETS[n].options) for n in TRAINING]
    expected += [("optim", "optim", C.OptimConfig), ("train", "train", C.TrainConfig)]
    tables = C.reference()
    assert len(tables) == len(expected)
    for (title, rows), (prefix, section, cls) in zip(tables, expected):
        assert title.startswith(prefix), (title, prefix)
        assert [k for k, _, _ in rows] == [f"{section}.{k}" for k in field_names(cls)], title
        assert all(h for _, _, h in rows), title
    text = C.reference_markdown()
    for title, rows in tables:
        assert f"#### {title}" in text
        assert all(f"| `{k}` |" in text for k, _, _ in rows)
    assert C.SECTIONS == ("model", "loss", "data", "optim", "train")
