"""Config validation: every error stops the run before training with exit status 2 and a
one-paragraph message naming the key (or path) and what is allowed — never a traceback."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import main
from conftest import REPO, tiny_config, write_config
from utils.config import config_hash, describe_keys, load_config_file, parse_set, phase_plan, resolve_config
from utils.errors import ConfigError, UserError


def _main_error(tmp_path, monkeypatch, capsys, raw=None, argv=(), text=None):
    """Run main.main on a config written to tmp_path; return (exit status, stderr)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg.json"
    if text is not None:
        path.write_text(text)
    else:
        write_config(path, raw)
    code = main.main(["--config", str(path), *argv])
    captured = capsys.readouterr()
    return code, captured.err


def _assert_user_error(code, err, tmp_path, *needles):
    assert code == 2, err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    # Nothing was trained or written.
    assert not (tmp_path / "logs").exists()


def _one_paragraph(err):
    assert "\n\n" not in err.strip()
    assert err.strip().count("\n") == 0, err


@pytest.mark.parametrize("overrides, needles", [
    ({"memroy_size": 100}, ["'memroy_size'", "did you mean memory_size?"]),
    ({"incre_epochs": 5}, ["'incre_epochs'", "did you mean epochs?"]),
    ({"init_epoch": 5}, ["'init_epoch'", "did you mean init_epochs?"]),
    ({"memory_size": "big"}, ["'memory_size'", "must be an integer", '"big"']),
    ({"memory_size": -5}, ["'memory_size'", "-5", "≥ 0"]),
    ({"fixed_memory": "yes"}, ["'fixed_memory'", "true or false"]),
    ({"init_milestones": [10, "x"]}, ["'init_milestones'", "list of integers"]),
    ({"model_name": "icarll"}, ["'model_name'", "icarll", "allowed:", "finetune", "lucir", "Did you mean icarl?"]),
    ({"dataset": "cifar1000"}, ["'dataset'", "cifar1000", "allowed:", "cifar100", "shapes"]),
    ({"convnet_type": "resnet33"}, ["'convnet_type'", "resnet33", "allowed:", "resnet32", "resnet18"]),
    ({"device": "gpu"}, ["'device'", "allowed: auto, cpu, cuda, cuda:N"]),
    ({"scheduler": "step"}, ["'scheduler'", "allowed: multistep, cosine, constant"]),
    # init_cls + increment·(num_phases−1) > the dataset's 6 classes
    ({"num_phases": 4}, ["num_phases=4", "need 8 classes", "has 6", "at most num_phases=3"]),
    ({"init_cls": 7}, ["'init_cls'", "7", "only 6 classes"]),
    ({"shapes": {"num_classes": 6, "n_train": 3}}, ["'shapes'", "n_train", "allowed"]),
    # issue 12: inputs that passed validation and then broke (or trained nothing)
    ({"seed": -1}, ["'seed'", "-1", "≥ 0"]),
    ({"seed": 2 ** 32}, ["'seed'", "4294967296", "≤ 4294967295"]),
    ({"seed": [1, 2 ** 40]}, ["'seed'", "≤ 4294967295"]),
    ({"batch_size": 1}, ["'batch_size'", "≥ 2"]),
    ({"input_size": 24}, ["'input_size'", "input_size 24", "image_size 16"]),
    ({"image_size": None, "input_size": 64}, ["'input_size'", "input_size 64", "image_size 32"]),
    ({"threads": 0}, ["'threads'", "≥ 1"]),
    ({"rrc_scale": [0.9, 0.1]}, ["'rrc_scale'", "0 < min ≤ max ≤ 1"]),
    ({"rrc_scale": [0.0, 0.0]}, ["'rrc_scale'", "0 < min ≤ max ≤ 1"]),
    ({"prefix": "../../elsewhere"}, ["'prefix'", "cannot contain '/'"]),
    ({"cache_dir": ""}, ["'cache_dir'", "empty string", "null to disable"]),
    # the bad-input sweep of 2026-11-27: each passed --check, then died in a traceback or trained nonsense
    ({"init_lr": 1e300}, ["'init_lr'", "1e+300", "±3.4e38"]),
    ({"rrc_scale": [0.5, 1e39]}, ["'rrc_scale'", "±3.4e38"]),
    ({"image_size": 100000}, ["'image_size'", "≤ 4096"]),
    ({"crop_padding": 16}, ["'crop_padding'", "is 16", "input_size 16", "padding alone"]),
    ({"cutout": 16}, ["'cutout'", "is 16", "input_size 16", "erases a whole image"]),
    ({"init_milestones": [8, 2]}, ["'init_milestones'", "[8, 2]", "strictly increasing"]),
    ({"milestones": [2, 2]}, ["'milestones'", "[2, 2]", "multiplies it twice"]),
    ({"seed": [1, 1]}, ["'seed'", "[1, 1]", "must not repeat"]),
    ({"cache_dir": "a\u0000b"}, ["'cache_dir'", "NUL"]),
    # the bad-input sweep of 2026-11-28: each passed --check, then crashed, hung or failed after training
    ({"prefix": "a\u0000b"}, ["'prefix'", "without NUL"]),
    ({"prefix": "a\ud800b"}, ["'prefix'", "cannot encode"]),
    ({"prefix": "p" * 300}, ["'prefix'", "at most 240 bytes"]),
    ({"threads": 100000}, ["'threads'", "≤ 4096"]),
    ({"threads": 4096}, ["'threads'", "is 4096", "CPU core(s)"]),
    ({"dist_timeout": 10 ** 12}, ["'dist_timeout'", "≤ 525600"]),
    ({"device": "cuda:007"}, ["'device'", "cuda:N"]),
    ({"device": "cuda:\u0663"}, ["'device'", "cuda:N"]),
    ({"shapes": {"train_per_class": 10 ** 9}}, ["'shapes.train_per_class'", "at most 100000"]),
    ({"synthetic_replay": {"source": "folder", "path": ".", "ratio": 1e30}}, ["'synthetic_replay.ratio'", "≤ 100"]),
    ({"in_memory": False}, ["'in_memory'", "'shapes'", "no image files to stream"]),
    ({"compression": "full", "compress_ratio": 1e9}, ["'compress_ratio'", "image_size 16", "at most 256",
                                                      "smaller than one pixel"]),
    # a sweep of edge values of 2026-11-27 (second): accepted, then silently another setting
    ({"compression": "cam", "mask_threshold": 1.0}, ["'mask_threshold'", "below 1", "compression 'full'"]),
    ({"compression": "center", "box_area": 0.0}, ["'box_area'", "every box would be empty"]),
    ({"synthetic_replay": {"source": "folder", "path": ".", "ratio": 0.01}},
     ["'synthetic_replay.ratio'", "round(0.01 × batch_size 32) = 0", "above 0.01562"]),
], ids=lambda v: None if isinstance(v, list) else "-".join(f"{k}={v[k]}" for k in v)[:40])
def test_config_errors_exit_2_with_a_message(tmp_path, monkeypatch, capsys, overrides, needles):
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(**overrides))
    _assert_user_error(code, err, tmp_path, *needles)
    _one_paragraph(err)


def test_learner_key_under_another_learner_is_refused(tmp_path, monkeypatch, capsys):
    # cbf_epochs belongs to LUCIR: with iCaRL it is an unknown key, named.
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(model_name="icarl", cbf_epochs=3))
    _assert_user_error(code, err, tmp_path, "'cbf_epochs'")
    _one_paragraph(err)
    # ... and accepted with LUCIR.
    assert resolve_config(tiny_config(model_name="lucir", cbf_epochs=3))["cbf_epochs"] == 3


def test_protocol_is_checked_before_any_image_is_loaded(tmp_path, monkeypatch, capsys):
    """A protocol that needs more classes than the dataset has is refused from the listing alone."""
    import trainer

    def no_loading(*args, **kwargs):
        raise AssertionError("the dataset must not be loaded before the protocol is checked")

    monkeypatch.setattr(trainer, "load_dataset", no_loading)
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(init_cls=2, increment=3, num_phases=4))
    _assert_user_error(code, err, tmp_path, "num_phases=4", "at most num_phases=3")


def test_bad_json_file(tmp_path, monkeypatch, capsys):
    code, err = _main_error(tmp_path, monkeypatch, capsys, text='{"memory_size": 100,}')
    _assert_user_error(code, err, tmp_path, "cfg.json", "not valid JSON")
    _one_paragraph(err)


@pytest.mark.parametrize("content, needle", [
    (b'{"prefix": "\xff\xfe"}', "not UTF-8 text"),              # Latin-1, say
    (b"[" * 100_000 + b"]" * 100_000, "nests its JSON too deeply"),
])
def test_config_file_that_cannot_be_read_as_json(tmp_path, monkeypatch, capsys, content, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.json").write_bytes(content)
    code = main.main(["--config", str(tmp_path / "cfg.json")])
    _assert_user_error(code, capsys.readouterr().err, tmp_path, "cfg.json", needle)


def test_config_that_is_not_an_object(tmp_path, monkeypatch, capsys):
    code, err = _main_error(tmp_path, monkeypatch, capsys, text='[1, 2]')
    _assert_user_error(code, err, tmp_path, "must hold a JSON object")


def test_missing_config_name_lists_the_available_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main(["--config", "no-such-config"]) == 2
    err = capsys.readouterr().err
    _assert_user_error(2, err, tmp_path, "no-such-config", "Available:", "smoke")
    _one_paragraph(err)


def test_no_config_argument(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main([]) == 2
    err = capsys.readouterr().err
    assert "--config is required" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["smoke", "smoke.json"])
def test_bare_name_is_looked_up_in_configs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)   # not the repository: the lookup must use configs/
    raw, config_name = load_config_file(name)
    assert config_name == "smoke"
    assert raw == json.loads((REPO / "configs" / "smoke.json").read_text())


def test_path_is_preferred_and_named_by_its_stem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "mine.json", {"memory_size": 7})
    assert load_config_file("mine") == ({"memory_size": 7}, "mine")
    assert load_config_file(str(tmp_path / "mine.json")) == ({"memory_size": 7}, "mine")


def test_a_config_path_that_is_a_folder_or_a_broken_link_says_so(tmp_path, monkeypatch):
    """It said "No config file" as for a misspelt name."""
    import os

    monkeypatch.chdir(tmp_path)
    (tmp_path / "somedir").mkdir()
    os.symlink(tmp_path / "gone.json", tmp_path / "broken.json")
    with pytest.raises(ConfigError, match=r"Config file somedir is a folder, not a file; give a JSON file"):
        load_config_file("somedir")
    with pytest.raises(ConfigError, match=r"Config file broken.json is a broken symbolic link"):
        load_config_file("broken")
    (tmp_path / "smoke").mkdir()   # a folder named like a shipped config does not hide configs/smoke.json
    assert load_config_file("smoke")[1] == "smoke"


def test_set_values_are_json_else_strings():
    assert parse_set(["memory_size=1000", "convnet_type=resnet18", "init_milestones=[30,60]",
                      "fixed_memory=true", "data_root=null", "prefix=a=b", "lr=0.5"]) == {
        "memory_size": 1000, "convnet_type": "resnet18", "init_milestones": [30, 60],
        "fixed_memory": True, "data_root": None, "prefix": "a=b", "lr": 0.5}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["memory_size"])
    with pytest.raises(ConfigError, match="--set x: the value nests its JSON too deeply"):
        parse_set(["x=" + "[" * 100_000 + "]" * 100_000])


def test_set_overrides_reach_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config())
    code = main.main(["--config", "tiny.json", "--check", "--set", "memory_size=1000",
                      "--set", "convnet_type=resnet18"])
    out = capsys.readouterr().out
    assert code == 0
    assert "backbone resnet18" in out
    assert "memory budget 500 units per class (1000 total)" in out      # 1000 // 2 classes in phase 0


def test_overrides_change_only_the_fields_of_a_block_they_name():
    from utils.config import apply_overrides

    raw = {"memory_size": 10, "shapes": {"num_classes": 6, "train_per_class": 40}}
    assert apply_overrides(raw, {"shapes": {"test_per_class": 4}, "memory_size": 20}) == {
        "memory_size": 20, "shapes": {"num_classes": 6, "train_per_class": 40, "test_per_class": 4}}
    assert apply_overrides(raw, {"shapes.num_classes": 8, "synthetic_replay.source": "folder"}) == {
        "memory_size": 10, "shapes": {"num_classes": 8, "train_per_class": 40},
        "synthetic_replay": {"source": "folder"}}
    assert raw == {"memory_size": 10, "shapes": {"num_classes": 6, "train_per_class": 40}}   # not changed
    with pytest.raises(ConfigError, match=r"'memory_size.x': 'memory_size' is 10, not a block"):
        apply_overrides(raw, {"memory_size.x": 1})


def test_balance_counts_at_its_default_leaves_every_foster_run_where_it_was():
    """FOSTER's balance_counts: the default "real" is what FOSTER did before the key, so it stays out of
    the hash (no run folder moves); another value is another run."""
    foster = resolve_config(tiny_config(model_name="foster"))
    assert foster["balance_counts"] == "real"
    assert config_hash(foster) == config_hash({k: v for k, v in foster.items() if k != "balance_counts"})
    for other in ("seen", "budget"):
        assert config_hash(foster) != config_hash({**foster, "balance_counts": other})


def test_keys_added_after_runs_existed_at_their_defaults_leave_every_run_where_it_was():
    """Keys whose defaults are what runs did before them (LUCIR's finetuning on plain samples,
    distinct herding; the inference passes' precision, whose default changed only GPU runs' numbers
    and is said in the README): no run folder moves; another value is another run."""
    lucir = resolve_config(tiny_config(model_name="lucir"))
    assert (lucir["cbf_balance"], lucir["amp_inference"], lucir["herding"]) == ("samples", False, "distinct")
    for key, other in (("cbf_balance", "classes"), ("amp_inference", True), ("herding", "welling")):
        assert config_hash(lucir) == config_hash({k: v for k, v in lucir.items() if k != key})
        assert config_hash(lucir) != config_hash({**lucir, key: other})


def test_set_of_a_block_field_keeps_the_configs_other_fields(tmp_path, monkeypatch, capsys):
    """`--set 'shapes={...}'` and `--set shapes.field=...` (the names --keys lists) change one field; the
    config's other fields of the block stay (they used to fall back to their defaults, silently)."""
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(shapes={"num_classes": 6, "train_per_class": 40,
                                                             "test_per_class": 20}))
    for argv in (["--set", 'shapes={"test_per_class": 4}'], ["--set", "shapes.test_per_class=4"]):
        assert main.main(["--config", "tiny.json", "--check", *argv]) == 0
        out = capsys.readouterr().out
        assert "(6 classes, 240 train / 24 test images)" in out, out
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(), argv=["--set", "shapes.num_clases=4"])
    _assert_user_error(code, err, tmp_path, "num_clases", "'shapes'", "num_classes")


def test_set_with_a_bad_value_is_a_config_error(tmp_path, monkeypatch, capsys):
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(), argv=["--set", "memory_size=big"])
    _assert_user_error(code, err, tmp_path, "'memory_size'", "must be an integer")
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(), argv=["--set", "memroy_size=10"])
    _assert_user_error(code, err, tmp_path, "did you mean memory_size?")
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(), argv=["--set", "memory_size"])
    _assert_user_error(code, err, tmp_path, "KEY=VALUE")


def test_folder_dataset_without_data_root(tmp_path, monkeypatch, capsys):
    raw = tiny_config(dataset="folder", shapes={})
    code, err = _main_error(tmp_path, monkeypatch, capsys, raw)
    _assert_user_error(code, err, tmp_path, "needs data_root", "train/<class>")


def test_folder_dataset_with_a_missing_data_root_names_the_path(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no" / "such" / "folder"
    raw = tiny_config(dataset="folder", shapes={}, data_root=str(missing))
    code, err = _main_error(tmp_path, monkeypatch, capsys, raw)
    _assert_user_error(code, err, tmp_path, str(missing), "does not exist", "train/<class>")
    # --check reports it the same way.
    code, err = _main_error(tmp_path, monkeypatch, capsys, raw, argv=["--check"])
    _assert_user_error(code, err, tmp_path, str(missing))
    # A file where the folder should be is named as such.
    (tmp_path / "file").write_text("x")
    raw = tiny_config(dataset="folder", shapes={}, data_root=str(tmp_path / "file"))
    code, err = _main_error(tmp_path, monkeypatch, capsys, raw)
    _assert_user_error(code, err, tmp_path, str(tmp_path / "file"), "is a file, not a folder")


def test_check_prints_the_plan_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import trainer

    monkeypatch.setattr(trainer.Trainer, "run", lambda *a, **k: pytest.fail("--check must not train"))
    monkeypatch.chdir(tmp_path)
    raw = tiny_config(memory_size=60)
    write_config(tmp_path / "tiny.json", raw)
    assert main.main(["--config", "tiny", "--check"]) == 0
    out = capsys.readouterr().out
    assert "phase 0: classes [0, 2) — 2 new; memory budget 30 units per class (60 total)" in out
    assert "phase 1: classes [2, 4) — 2 new; memory budget 15 units per class (60 total)" in out
    assert "phase 2: classes [4, 6) — 2 new; memory budget 10 units per class (60 total)" in out
    assert "phase 3" not in out
    expected = f"logs/icarl/shapes/tiny-{config_hash(resolve_config(raw))}/seed1993"
    assert f"output: {expected}" in out.replace("\\", "/")
    # a learner without memory has no budget; every seed of a list shows its own class order
    assert main.main(["--config", "tiny", "--check", "--set", "model_name=finetune", "--set", "seed=[1, 2]"]) == 0
    out = capsys.readouterr().out
    assert "phase 0: classes [0, 2) — 2 new; no exemplar memory" in out and "memory budget" not in out
    assert "class order (seed 1):" in out and "class order (seed 2):" in out
    assert not (tmp_path / "logs").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny.json"]


def test_check_with_fixed_memory_and_seed_list(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(fixed_memory=True, memory_per_class=7, seed=[1, 2]))
    assert main.main(["--config", "tiny", "--check", "--output", "out"]) == 0
    out = capsys.readouterr().out.replace("\\", "/")
    assert "memory budget 7 units per class (14 total)" in out
    assert "memory budget 7 units per class (42 total)" in out
    assert "output: out/seed1" in out and "output: out/seed2" in out
    assert not (tmp_path / "out").exists()


def test_keys_lists_every_key(capsys):
    assert main.main(["--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("memory_size", "init_cls", "lambda_base", "cbf_epochs", "T"):
        assert f"`{key}`" in out


def test_readme_key_reference_is_describe_keys_and_marks_the_keys_outside_identity():
    """The README's key reference is `main.py --keys` verbatim (regenerate it when a key changes),
    and a key left out of the config hash says so, e.g. compile, which changes float rounding."""
    from utils.config import _NOT_HASHED, describe_keys

    readme = (REPO / "README.md").read_text()
    reference = readme[readme.index("### common\n", readme.index("## Configuration key reference")):]
    assert reference.rstrip("\n") == describe_keys().rstrip("\n")
    rows = {line.split("`")[1]: line for line in reference.splitlines() if line.startswith("| `")}
    outside = {key for key, line in rows.items() if "Not part of a run's identity" in line}
    assert outside == set(_NOT_HASHED) - {"seed"} and "compile" in outside


def test_key_tables_are_in_name_order_whatever_was_imported_first(monkeypatch):
    """--keys (and the README) list learners and plugins by name: registration order followed the
    imports, and a test importing models.foster first made the README check fail."""
    from models import registry

    learners = dict(registry.LEARNERS)
    monkeypatch.setattr(registry, "LEARNERS", dict(reversed(list(learners.items()))))
    heads = [line for line in describe_keys().splitlines() if line.startswith("### ")]
    learner_heads = [h for h in heads if h.startswith("### learner")]
    assert learner_heads == sorted(learner_heads) and heads[0] == "### common"
    assert learner_heads[0].startswith("### learner der")


def test_resolved_config_has_every_key_with_defaults():
    cfg = resolve_config({"model_name": "lucir"})
    assert cfg["memory_size"] == 2000 and cfg["lambda_base"] == 5.0 and cfg["K"] == 2
    assert cfg["margin"] == 0.5 and cfg["seed"] == 1993 and cfg["fixed_memory"] is False
    assert isinstance(resolve_config({"init_lr": 1})["init_lr"], float)   # ints widen for float keys


def test_config_hash_ignores_where_and_how_fast_only():
    base = resolve_config(tiny_config())
    same = resolve_config(tiny_config(device="auto", eval_batch_size=64, seed=7, cache_dir="x"))
    other = resolve_config(tiny_config(memory_size=61))
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(other)


def test_phase_plan_ranges():
    cfg = resolve_config(tiny_config(init_cls=3, increment=1, num_phases=None))
    assert phase_plan(cfg, 6) == [(0, 3), (3, 4), (4, 5), (5, 6)]
    cfg = resolve_config(tiny_config(init_cls=2, increment=2, num_phases=2))
    assert phase_plan(cfg, 6) == [(0, 2), (2, 4)]


def test_config_error_in_a_subprocess_has_no_traceback(tmp_path):
    path = write_config(tmp_path / "bad.json", tiny_config(memroy_size=10))
    proc = subprocess.run([sys.executable, "main.py", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "did you mean memory_size?" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0    # one paragraph
    assert not list((REPO / "logs" / "icarl" / "shapes").glob("bad-*"))   # nothing written


def test_the_old_dataset_name_synthetic_is_read_as_shapes_with_a_notice(capsys):
    raw = tiny_config()
    raw["dataset"] = "synthetic"
    raw["synthetic"] = raw.pop("shapes")
    cfg = resolve_config(raw)
    assert cfg["dataset"] == "shapes" and cfg["shapes"]["num_classes"] == 6 and "synthetic" not in cfg
    err = capsys.readouterr().err
    assert "dataset 'synthetic' is now called 'shapes'" in err and "config key 'synthetic' is now called 'shapes'" in err


# ---- folder identity: only the keys that can change this run's result are hashed ----------------

def test_config_hash_ignores_disabled_plugins(monkeypatch):
    """A plain iCaRL run keeps its hash (hence its folder and --resume) when a plugin it does not
    use changes a default or a new plugin is registered; enabling compression changes it."""
    from dataclasses import replace

    from models.cim import ExemplarCompression
    from models.plugins import PLUGINS, Plugin
    from utils.config import Option

    plain = resolve_config(tiny_config())
    before = config_hash(plain)
    compressed = resolve_config(tiny_config(compression="cim"))
    assert config_hash(compressed) != before

    # A disabled plugin's default changes: the resolved config changes, its hash does not.
    options = dict(ExemplarCompression.options)
    options["mask_threshold"] = replace(options["mask_threshold"], default=0.5)
    monkeypatch.setattr(ExemplarCompression, "options", options)
    plain_now = resolve_config(tiny_config())
    assert plain_now["mask_threshold"] == 0.5
    assert config_hash(plain_now) == before
    assert config_hash(resolve_config(tiny_config(compression="cim"))) != config_hash(compressed)

    # A new plugin is registered (disabled unless its key says otherwise).
    class Replay(Plugin):
        options = {"replay_images": Option(0, "int", "test plugin", min=0)}

        @classmethod
        def enabled(cls, cfg):
            return cfg["replay_images"] > 0

    monkeypatch.setitem(PLUGINS, "test_replay", Replay)
    assert config_hash(resolve_config(tiny_config())) == before
    assert config_hash(resolve_config(tiny_config(replay_images=5))) != before


def _add_common_key(monkeypatch, name="new_knob", default=0):
    from utils import config as config_module
    from utils.config import Option

    monkeypatch.setitem(config_module.COMMON_OPTIONS, name, Option(default, "int", "added later", min=0))


def test_resume_allows_a_key_added_since_at_its_default(tmp_path, monkeypatch, capsys):
    """A run written before a key existed resumes when the key is at its default, with a notice
    naming it; at another value the resumption is refused naming the key."""
    from conftest import read_results, run

    out = tmp_path / "run"
    run(tiny_config(), out, stop_after_phase=0)
    _add_common_key(monkeypatch)
    capsys.readouterr()
    results = run(tiny_config(), out, resume=True)
    assert [p["phase"] for p in results["phases"]] == [0, 1, 2]
    notice = "resume: the saved config has no key new_knob (added since); resuming with its default 0"
    assert notice in capsys.readouterr().out
    assert notice in (out / "log.txt").read_text()
    assert read_results(out)["config"]["new_knob"] == 0

    monkeypatch.undo()   # back to the schema without the key
    other = tmp_path / "other"
    run(tiny_config(), other, stop_after_phase=0)
    _add_common_key(monkeypatch)
    from utils.errors import UserError

    with pytest.raises(UserError, match="differs from this one in new_knob"):
        run(tiny_config(new_knob=3), other, resume=True)


# ---- issue 12 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, needle", [
    ({"seed": 2 ** 32}, "'seed'"),
    ({"input_size": 24}, "'input_size'"),
    ({"batch_size": 1}, "'batch_size'"),
    ({"prefix": "p" * 300}, "'prefix'"),
    ({"threads": 4096}, "'threads'"),
])
def test_bad_values_are_refused_by_check_too(tmp_path, monkeypatch, capsys, overrides, needle):
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(**overrides), argv=["--check"])
    _assert_user_error(code, err, tmp_path, needle)


def test_image_size_smaller_than_the_datasets_input_is_refused():
    with pytest.raises(ConfigError, match="'image_size'.*input_size 32 is larger than the stored image_size 16"):
        resolve_config(tiny_config(image_size=16, input_size=None))
    resolve_config(tiny_config(image_size=40, input_size=None))   # 32 ≤ 40: fine


def test_phase_plan_adds_a_smaller_last_phase_for_leftover_classes():
    cfg = resolve_config(tiny_config(init_cls=4, increment=4, num_phases=None))
    assert phase_plan(cfg, 10) == [(0, 4), (4, 8), (8, 10)]
    # a given num_phases that fits is honoured; the leftover phase counts as one
    assert phase_plan(resolve_config(tiny_config(init_cls=4, increment=4, num_phases=2)), 10) == [(0, 4), (4, 8)]
    assert phase_plan(resolve_config(tiny_config(init_cls=4, increment=4, num_phases=3)), 10) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ConfigError, match=r"at most num_phases=3 \(the last one with 2 classes\)"):
        phase_plan(resolve_config(tiny_config(init_cls=4, increment=4, num_phases=4)), 10)


def test_check_prints_the_leftover_phase_and_unused_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "a.json", tiny_config(init_cls=2, increment=3))   # 6 classes: 2 + 3 + 1
    assert main.main(["--config", "a", "--check"]) == 0
    out = capsys.readouterr().out
    assert "phase 2: classes [5, 6) — 1 new" in out
    assert "note: the last phase has 1 classes" in out
    write_config(tmp_path / "b.json", tiny_config(num_phases=2))             # uses 4 of 6 classes
    assert main.main(["--config", "b", "--check"]) == 0
    assert "2 of the dataset's 6 classes are not used (num_phases=2)" in capsys.readouterr().out


def test_result_key_differences_include_the_seed_but_not_where_or_how_fast():
    from utils.config import result_key_differences

    base = resolve_config(tiny_config())
    assert result_key_differences(base, base) == []
    assert result_key_differences(base, resolve_config(tiny_config(seed=7))) == ["seed"]
    assert result_key_differences(base, resolve_config(tiny_config(device="auto", threads=2, eval_batch_size=64,
                                                                    checkpoints="last", prefix="x"))) == []
    assert result_key_differences(base, resolve_config(tiny_config(seed=7, memory_size=50))) == ["memory_size", "seed"]


def test_threads_flag_sets_the_key(tmp_path, monkeypatch, capsys):
    import trainer

    seen = {}

    class Fake:
        def __init__(self, cfg, out, name):
            seen["threads"] = cfg["threads"]

        def run(self, resume=False):
            return {}

    monkeypatch.setattr(trainer, "Trainer", Fake)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "t.json", tiny_config())
    assert main.main(["--config", "t", "--threads", "1"]) == 0
    assert seen["threads"] == 1
    assert resolve_config(tiny_config())["threads"] is None


def test_stored_form_is_resolved_and_identifies_only_whole_runs(tmp_path, monkeypatch, capsys):
    shapes = resolve_config(tiny_config())
    assert shapes["stored_form"] == "crop"
    # the crop form leaves every existing run's identity (folder, resume) where it was
    assert config_hash(shapes) == config_hash({k: v for k, v in shapes.items() if k != "stored_form"})
    folder = resolve_config(tiny_config(dataset="folder", data_root=str(tmp_path), shapes={},
                                        augment="resized_crop"))
    assert folder["stored_form"] == "whole"
    crop = resolve_config(tiny_config(dataset="folder", data_root=str(tmp_path), shapes={},
                                      augment="resized_crop", stored_form="crop"))
    assert config_hash(crop) != config_hash(folder)
    assert resolve_config(tiny_config(dataset="folder", shapes={}, augment="crop_flip"))["stored_form"] == "crop"
    # whole where it cannot apply: exit 2 naming the key
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(stored_form="whole"))
    _assert_user_error(code, err, tmp_path, "'stored_form'", "'whole'")
    code, err = _main_error(tmp_path, monkeypatch, capsys, tiny_config(stored_form="squash"))
    _assert_user_error(code, err, tmp_path, "'stored_form'", "crop", "whole")


def test_a_config_saved_before_stored_form_existed_is_the_crop_form(tmp_path):
    from utils.config import resolve_saved_config, result_key_differences

    saved = tiny_config(dataset="folder", data_root=str(tmp_path), shapes={}, augment="resized_crop")
    old, added = resolve_saved_config(saved)
    assert old["stored_form"] == "crop" and "stored_form" not in added
    assert result_key_differences(old, resolve_config(saved)) == ["stored_form"]   # today's default: whole
    assert resolve_saved_config(tiny_config())[0] == resolve_config(tiny_config())  # crop datasets: unchanged


def test_stream_decode_applies_to_streamed_sets_and_identifies_device_runs(tmp_path, monkeypatch, capsys):
    from utils.config import result_key_differences

    base = resolve_config(tiny_config())
    assert base["stream_decode"] == "workers"
    # the default leaves every existing run's identity (folder, resume) where it was
    assert config_hash(base) == config_hash({k: v for k, v in base.items() if k != "stream_decode"})
    streamed = dict(dataset="folder", data_root=str(tmp_path), shapes={}, in_memory=False)
    workers = resolve_config(tiny_config(**streamed))
    device = resolve_config(tiny_config(**streamed, stream_decode="device"))
    # other pixels reach the network: another run
    assert config_hash(device) != config_hash(workers)
    assert result_key_differences(workers, device) == ["stream_decode"]
    inet = resolve_config(tiny_config(dataset="imagenet1000", data_root=str(tmp_path), shapes={},
                                      stream_decode="device"))   # streams by default
    assert inet["stream_decode"] == "device"
    # where nothing streams, or a value that does not exist: exit 2 naming the key
    for raw, needles in [
        (tiny_config(stream_decode="device"), ["'stream_decode'", "'device'", "'shapes'", "not decoded from image files"]),
        (tiny_config(**{**streamed, "in_memory": None}, stream_decode="device"),
         ["'stream_decode'", "'folder'", "held in memory", "in_memory false"]),
        (tiny_config(dataset="imagenet1000", data_root=str(tmp_path), shapes={}, in_memory=True,
                     stream_decode="device"), ["'stream_decode'", "held in memory"]),
        (tiny_config(**streamed, stream_decode="gpu"), ["'stream_decode'", '"gpu"', "workers, device"]),
    ]:
        code, err = _main_error(tmp_path, monkeypatch, capsys, raw)
        _assert_user_error(code, err, tmp_path, *needles)
        _one_paragraph(err)


def test_every_row_of_the_key_reference_has_three_cells():
    """A description with ``|`` in it (``none | full | …``) stays in its cell: the README's key
    reference is made of these rows."""
    rows = [line for line in describe_keys().splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) == 3, row
    assert any("\\|" in row for row in rows)          # compression's policies, escaped


def test_settings_notes_name_what_a_run_will_not_use():
    """Accepted (PyCIL configs carry such keys) but said: a plugin's keys while it is off, milestones
    under another scheduler, and milestones a stage never reaches (the lr never decays there)."""
    from utils.config import settings_notes

    assert settings_notes(resolve_config(tiny_config())) == []
    off = settings_notes(resolve_config(tiny_config(compress_ratio=8, synthetic_replay={"path": "/x", "per_class": 5})))
    assert off == ["note: plugin cim is off in this run, so compress_ratio (set away from the default) has no effect.",
                   "note: plugin synthetic_replay is off in this run, so synthetic_replay.path, "
                   "synthetic_replay.per_class (set away from the default) have no effect."]
    assert settings_notes(resolve_config(tiny_config(compression="cim", compress_ratio=8))) == []

    cosine = settings_notes(resolve_config(tiny_config(scheduler="cosine", init_milestones=[1], milestones=[])))
    assert cosine == ['note: init_milestones [1] has no effect: it applies only with scheduler "multistep", and '
                      'scheduler is "cosine".']
    late = settings_notes(resolve_config(tiny_config(scheduler="multistep", init_epochs=5, init_milestones=[2, 5, 9],
                                                     epochs=3, milestones=[1, 2])))
    assert late == ["note: init_milestones 5, 9 are not below init_epochs 5: the lr never decays there."]
    assert settings_notes(resolve_config(tiny_config(fixed_memory=True, memory_per_class=5))) == \
        ['note: memory_size 60 has no effect: it applies only with fixed_memory false, and fixed_memory is true.']
    lucir = settings_notes(resolve_config(tiny_config(model_name="lucir", cbf_epochs=4, cbf_milestones=[4])))
    assert lucir == ["note: cbf_milestones 4 is not below cbf_epochs 4: the lr never decays there."]
    assert settings_notes(resolve_config(tiny_config(model_name="lucir", cbf_epochs=0, cbf_milestones=[4]))) == []


def test_no_shipped_config_gets_a_settings_note():
    from utils.config import CONFIG_DIR, settings_notes

    for path in sorted(CONFIG_DIR.glob("*.json")):
        raw, _ = load_config_file(str(path))
        assert settings_notes(resolve_config(raw)) == [], path.name


def test_a_gpu_index_the_machine_lacks_is_refused_by_name(monkeypatch):
    """cuda:5 on a one-GPU machine failed at the first .to(), with CUDA's traceback."""
    import torch

    from trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"'device' is 'cuda:5', but this machine has 1 GPU\(s\) \(cuda:0 … cuda:0\)"):
        resolve_device("cuda:5")


def test_a_data_location_key_the_dataset_ignores_leaves_the_run_where_it_was():
    """data_root of the procedural shapes, class_list outside imagenet100, shapes of a real dataset:
    ignored by the format, so neither the run folder nor a resume depends on them; where the format
    reads them they identify the run as before."""
    from utils.config import result_key_differences

    shapes = resolve_config(tiny_config())
    with_root = resolve_config(tiny_config(data_root="/anywhere"))
    assert config_hash(with_root) == config_hash(shapes) and result_key_differences(shapes, with_root) == []
    tiny = resolve_config(tiny_config(dataset="tinyimagenet", data_root="/data/tiny", shapes={}))
    for ignored in ({"class_list": "/lists/x.txt"}, {"shapes": {"num_classes": 4}}):
        other = resolve_config(tiny_config(dataset="tinyimagenet", data_root="/data/tiny", **{"shapes": {}, **ignored}))
        assert config_hash(other) == config_hash(tiny) and result_key_differences(tiny, other) == []
    assert config_hash(resolve_config(tiny_config(dataset="tinyimagenet", data_root="/data/other", shapes={}))) \
        != config_hash(tiny)
    im = resolve_config(tiny_config(dataset="imagenet100", data_root="/data/im", shapes={}))
    listed = resolve_config(tiny_config(dataset="imagenet100", data_root="/data/im", shapes={}, class_list="/l.txt"))
    assert config_hash(listed) != config_hash(im) and result_key_differences(im, listed) == ["class_list"]
