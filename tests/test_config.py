import pytest
import yaml

from dscl.config import ConfigError, config_from_dict, dump_config, load_config, parse_overrides, preset_names


def test_presets_shipped_and_load():
    names = preset_names()
    for expected in ("smoke", "fmnist-lt", "cifar10-lt", "cifar100-lt", "imagenet-lt", "inat2018", "places-lt"):
        assert expected in names
        cfg = load_config(expected)
        assert cfg.preset == expected


def test_default_preset_is_fmnist_lt():
    cfg = load_config()
    assert cfg.preset == "fmnist-lt"
    assert cfg.data.dataset == "fmnist-lt"
    assert cfg.data.image_size == 28


def test_imagenet_preset_has_official_hyperparameters():
    cfg = load_config("imagenet-lt")
    assert cfg.model.backbone == "resnet50"
    assert cfg.optim.epochs == 200 and cfg.optim.batch_size == 256 and cfg.optim.base_lr == 0.1
    assert cfg.model.queue_size == 65536 and cfg.model.momentum == 0.999
    assert cfg.loss.temperature == 0.07 and cfg.loss.pbsd_weight == 1.5
    assert cfg.loss.alpha == pytest.approx(1 / 9)
    assert cfg.views.num_patches == 5 and cfg.views.patch_size == 64
    assert cfg.views.patch_scale == (0.05, 0.6)
    assert cfg.classifier.lr == 10.0 and cfg.classifier.batch_size == 2048
    assert cfg.classifier.milestones == (20, 30) and cfg.classifier.epochs == 40


def test_overrides_are_typed():
    cfg = load_config("smoke", overrides=["optim.epochs=7", "loss.alpha=0.25", "views.patch_scale=[0.1, 0.5]",
                                          "model.backbone=resnet18", "data.data_root=/tmp/x"])
    assert cfg.optim.epochs == 7 and isinstance(cfg.optim.epochs, int)
    assert cfg.loss.alpha == 0.25
    assert cfg.views.patch_scale == (0.1, 0.5)
    assert cfg.model.backbone == "resnet18"
    assert cfg.data.data_root == "/tmp/x"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.epoch=3", "valid keys of optim"),
        ("optimizer.epochs=3", "valid sections"),
        ("optim.epochs=three", "must be an integer"),
        ("loss.alpha=0", "loss.alpha must be a number in (0, 1]"),
        ("data.imbalance_factor=0.5", "data.imbalance_factor must be a number >= 1"),
        ("model.channels_last=maybe", "true or false"),
        ("optim.epochs", "section.key=value"),
        ("data.dataset=mnist", "data.dataset must be fmnist-lt, cifar10-lt, cifar100-lt, split or folder, got 'mnist'"),
        ("views.augment_on=gpu", "views.augment_on must be auto, loader (per sample, DataLoader workers) or device "
                                 "(batched on the training device), got 'gpu'"),
        ("optim.amp=fp8", "optim.amp must be none, bf16 or fp16, got 'fp8'"),
        ("loss.loss=supcon", "loss.loss must be dscl, scl or ce, got 'supcon'"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides=[override])
    assert needle in str(info.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        load_config("imagenet")
    assert "imagenet-lt" in str(info.value) and "smoke" in str(info.value)


def test_config_file_and_roundtrip(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  epochs: 3\nloss:\n  loss: scl\n")
    cfg = load_config("smoke", str(extra), ["optim.seed=5"])
    assert cfg.optim.epochs == 3 and cfg.loss.loss == "scl" and cfg.optim.seed == 5
    dump_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("smoke", str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("smoke", str(tmp_path / "missing.yaml"))


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "a.c=x=y"]) == {"a": {"b": "1", "c": "x=y"}}


# ----------------------------------------------------------------------------------------------
# issue #12 item 8: every numeric key is range-checked, and the message names the key


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.image_size=0", "data.image_size must be an integer >= 8, got 0"),
        ("model.dim=0", "model.dim must be an integer >= 1, got 0"),
        ("model.queue_size=-1", "model.queue_size must be an integer >= 0"),
        ("optim.batch_size=0", "optim.batch_size must be an integer >= 1"),
        ("classifier.batch_size=0", "classifier.batch_size must be an integer >= 1"),
        ("views.patch_size=0", "views.patch_size must be an integer >= 1"),
        ("views.patch_size=29", "views.patch_size (29) must be <= data.image_size (28)"),
        ("data.num_workers=-2", "data.num_workers must be an integer >= -1"),
        ("optim.base_lr=0", "optim.base_lr must be a number > 0"),
        ("optim.base_lr=.inf", "optim.base_lr must be a number > 0, got inf"),
        ("classifier.lr=-1", "classifier.lr must be a number > 0"),
        ("optim.momentum=1", "optim.momentum must be a number in [0, 1)"),
        ("optim.log_every=0", "optim.log_every must be an integer >= 1"),
        ("optim.seed=-1", "optim.seed must be an integer in [0, 4294967295]"),
        ("optim.epochs=null", "optim.epochs must be set"),
        ("classifier.gamma=0", "classifier.gamma must be a number in (0, 1]"),
        ("classifier.milestones=[30, 20]", "classifier.milestones must be increasing epochs >= 1"),
        ("views.patch_ratio=[2, 1]", "views.patch_ratio must be [low, high]"),
        ("eval.many_threshold=-1", "eval.many_threshold must be an integer >= 0"),
    ],
)
def test_numeric_keys_are_range_checked(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides=[override])
    assert needle in str(info.value)


def test_every_numeric_key_declares_its_range():
    """Every int / float key (optional ones too) declares its range with the field (config.in_range), and
    every declared choice list holds the field's default."""
    import dataclasses

    from dscl.config import SECTIONS, Config, field_types

    cfg = Config()
    for section in SECTIONS:
        sub = getattr(cfg, section)
        types = field_types(type(sub))
        for f in dataclasses.fields(sub):
            numeric = types[f.name] in (int, float, int | None, float | None)
            assert numeric == ("range" in f.metadata), f"{section}.{f.name}: declare its range with in_range()"
            if "choices" in f.metadata:
                assert f.default in f.metadata["choices"], f"{section}.{f.name}"


def test_optional_keys_are_cleared_and_typed_by_their_declared_type():
    """Coercion follows the resolved field type: none/null clear an optional key whatever it holds, an
    optional int reads a string as an integer, an optional path stays a string."""
    cfg = load_config("smoke", overrides=["data.n_max=50", "data.val_per_class=3", "model.pretrained=/w.pt"])
    assert cfg.data.n_max == 50 and cfg.data.val_per_class == 3 and cfg.model.pretrained == "/w.pt"
    cleared = load_config("smoke", overrides=["data.n_max=none", "model.pretrained=null", "data.data_root=NONE"])
    assert cleared.data.n_max is None and cleared.model.pretrained is None and cleared.data.data_root is None
    with pytest.raises(ConfigError, match="data.n_max must be an integer"):
        load_config("smoke", overrides=["data.n_max=many"])
    with pytest.raises(ConfigError, match="data.n_max must be an integer >= 1"):
        load_config("smoke", overrides=["data.n_max=0"])
    assert load_config("smoke", overrides=["classifier.milestones=[5, 9]"]).classifier.milestones == (5, 9)
    assert load_config("smoke", overrides=["views.global_scale=[1, 1]"]).views.global_scale == (1.0, 1.0)


def test_preset_descriptions():
    from dscl.config import preset_description

    for name in preset_names():
        assert preset_description(name).endswith("."), name
    assert preset_description("smoke") == (
        "Seconds on a CPU: a tiny Fashion-MNIST-LT subset, 2 epochs, for tests and for trying the CLI.")


def test_official_profile_sets_the_official_conventions():
    from dscl.config import PROFILES, preset_changes

    cfg = load_config("fmnist-lt", profile="official")
    assert cfg.profile == "official"
    assert (cfg.model.patch_bn, cfg.model.roi_aligned, cfg.model.queue_init) == ("per-slot", False, "random")
    assert cfg.classifier.protocol == "official" and not cfg.classifier.standardize and cfg.classifier.update_bn
    assert cfg.optim.epochs == load_config("fmnist-lt").optim.epochs  # hyperparameters stay the preset's
    assert preset_changes(cfg) == []  # the preset under its profile: expected numbers still apply
    own = load_config("fmnist-lt", overrides=["model.queue_init=empty"], profile="official")
    assert own.model.queue_init == "empty" and preset_changes(own) == ["model.queue_init"]  # overrides win
    default = load_config("fmnist-lt")
    assert default.profile == "default" and default.model.queue_init == "empty" and default.model.roi_aligned
    assert set(PROFILES) == {"default", "official", "gpaco", "bcl"}  # the last two: tests/test_policies.py
    with pytest.raises(ConfigError, match="unknown profile 'paper'"):
        load_config("smoke", profile="paper")
    back = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert back.profile == "official" and back.to_dict() == cfg.to_dict()


def test_paper_scale_presets_use_per_slot_patch_bn():
    for name in ("imagenet-lt", "inat2018", "places-lt"):
        assert load_config(name).model.patch_bn == "per-slot"
    with pytest.raises(ConfigError, match="model.patch_bn must be per-slot"):
        load_config("smoke", overrides=["model.patch_bn=slot"])
    with pytest.raises(ConfigError, match="model.queue_init must be empty or random"):
        load_config("smoke", overrides=["model.queue_init=zeros"])


def test_val_per_class_must_not_be_negative():
    from dscl.config import ConfigError

    with pytest.raises(ConfigError, match="val_per_class"):
        load_config("smoke", overrides=["data.val_per_class=-1"])


# ----------------------------------------------------------------------------------------------
# issue 28 item 10: every float spelling Python accepts, on the command line and in files


@pytest.mark.parametrize("text, value", [("5e-4", 5e-4), ("5E-4", 5e-4), ("1e-2", 1e-2), (".5", 0.5),
                                         ("1_000.5", 1000.5), ("+2e0", 2.0), ("3", 3.0)])
def test_float_keys_take_every_python_float_spelling(text, value):
    cfg = load_config("smoke", overrides=[f"optim.weight_decay={text}"])
    assert cfg.optim.weight_decay == value and isinstance(cfg.optim.weight_decay, float)


def test_scientific_notation_in_a_config_file(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  base_lr: 1e-2\n  weight_decay: 5E-4\n  epochs: 1e1\nclassifier:\n  lr: .5\n")
    cfg = load_config("smoke", str(extra))
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.classifier.lr) == (1e-2, 5e-4, 0.5)
    assert cfg.optim.epochs == 10 and isinstance(cfg.optim.epochs, int)
    assert load_config("smoke", overrides=["views.global_scale=[1e-1, 1]"]).views.global_scale == (0.1, 1.0)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.epochs=1e3", None),  # integral: 1000
        ("optim.epochs=2.5e0", "optim.epochs must be an integer, got '2.5e0'"),
        ("optim.epochs=1e400", "optim.epochs must be an integer, got '1e400'"),
        ("optim.base_lr=inf", "optim.base_lr must be a number > 0, got inf"),
        ("optim.base_lr=nan", "optim.base_lr must be a number > 0, got nan"),
        ("optim.base_lr=1e-2x", "optim.base_lr must be a number, got '1e-2x'"),
    ],
)
def test_int_keys_take_integral_scientific_notation_only(override, needle):
    if needle is None:
        assert load_config("smoke", overrides=[override]).optim.epochs == 1000
        return
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides=[override])
    assert needle in str(info.value)


# ----------------------------------------------------------------------------------------------
# issue 28 item 11: an empty value is refused; none / null is the spelling that clears an optional key


@pytest.mark.parametrize("override", ["data.n_max=", "data.data_root=", "data.n_max= ", "optim.epochs=",
                                      "model.backbone=", "log.trackers="])
def test_an_empty_override_is_refused_and_points_at_none(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides=[override])
    msg = str(info.value)
    assert f"{key} is empty" in msg and "\n" not in msg
    optional = key in ("data.n_max", "data.data_root")
    assert (f"{key}=none" in msg) == optional


@pytest.mark.parametrize("override, needle", [("optim.epochs=[1", "optim.epochs must be an integer, got '[1'"),
                                             ("views.global_scale=[0.1", "views.global_scale: '[0.1' is not a value")])
def test_an_override_that_is_not_yaml_is_one_line(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides=[override])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_an_empty_string_in_a_config_file_is_refused_but_null_clears(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  n_max: ''\n")
    with pytest.raises(ConfigError, match="data.n_max is empty"):
        load_config("smoke", str(extra))
    extra.write_text("data:\n  n_max: null\n  val_per_class:\n")
    cfg = load_config("smoke", str(extra), ["data.n_max=50", "data.n_max=none"])
    assert cfg.data.n_max is None and cfg.data.val_per_class is None


def test_override_help_says_how_to_clear_a_key():
    import argparse

    from dscl.cli.common import config_args

    parser = argparse.ArgumentParser()
    config_args(parser)
    assert "=none" in " ".join(parser.format_help().split())


# ----------------------------------------------------------------------------------------------
# issue 28 item 3: malformed YAML is one line naming the file, the line and the column


def test_malformed_yaml_is_one_line_with_file_line_and_column(tmp_path):
    from dscl.config import config_from_file

    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: 3\n  base_lr: [0.1\nloss:\n  alpha: 0.2\n")
    for call in (lambda: load_config("smoke", str(bad)), lambda: config_from_file(bad)):
        with pytest.raises(ConfigError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"{bad}: line ") and ", column " in msg and "\n" not in msg
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("optim:\n\tepochs: 3\n")
    with pytest.raises(ConfigError, match=rf"^{tabs}: line 2, column 1: "):
        load_config("smoke", str(tabs))


# ---------------------------------------------------------------------------------------------------- backbones


def test_backbone_args_take_a_flow_mapping_on_the_command_line_and_a_mapping_in_a_file(tmp_path):
    cfg = load_config("smoke", overrides=["model.backbone=timm:vit_tiny_patch16_224",
                                          "model.backbone_args={depth: 2, embed_dim: 64, img_size: [64, 64]}",
                                          "model.pool=cls"])
    assert cfg.model.backbone_args == {"depth": 2, "embed_dim": 64, "img_size": [64, 64]} and cfg.model.pool == "cls"
    dump_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["backbone_args"]["depth"] == 2
    (tmp_path / "c.yaml").write_text("model:\n  backbone: open_clip:ViT-B-16\n  backbone_args:\n    width: 32\n")
    assert load_config("smoke", config_file=str(tmp_path / "c.yaml")).model.backbone_args == {"width": 32}
    assert load_config("smoke").model.backbone_args == {} and load_config("smoke").model.pool == "avg"
    assert load_config("smoke", overrides=["model.backbone_args=none"]).model.backbone_args == {}
    # a config.yaml written before the keys existed: no arguments, average pooling
    assert config_from_dict({"model": {"backbone": "convnet"}}).model.backbone_args == {}


@pytest.mark.parametrize(("override", "needle"), [
    (["model.backbone=tf:resnet50"], "model.backbone='tf:resnet50': unknown backbone family 'tf'"),
    (["model.backbone=timm:"], "the backbone name is empty"),
    (["model.backbone=resnet99"], "model.backbone='resnet99' is not a built-in backbone"),
    (["model.pool=cls"], "model.pool=cls needs a class token"),
    (["model.pool=max"], "model.pool must be avg or cls"),
    (["model.backbone_args={depth: 2}"], "model.backbone_args: the built-in convnet takes only zero_init_residual"),
    (["model.backbone=timm:vit_tiny_patch16_224", "model.backbone_args=[2]"],
     "model.backbone_args must be a mapping like {depth: 2, embed_dim: 64}"),
])
def test_bad_backbone_keys_name_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config("smoke", overrides=override)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
