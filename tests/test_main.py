"""The command line end to end: output folders, seed lists, --resume, divergence."""
from __future__ import annotations

import json
from pathlib import Path

import main
from conftest import read_results, run, tiny_config, without_seconds, write_config
from utils.config import config_hash, resolve_config

FAST = dict(num_phases=2, init_epochs=1, epochs=1)


def test_default_output_folder_and_one_run_per_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    raw = tiny_config(seed=[1, 2], **FAST)
    write_config(tmp_path / "tiny.json", raw)
    assert main.main(["--config", "tiny", "--device", "cpu"]) == 0
    base = Path("logs") / "icarl" / "shapes" / f"tiny-{config_hash(resolve_config(raw))}"
    assert sorted(p.name for p in (tmp_path / "logs").rglob("seed*")) == ["seed1", "seed2"]
    orders = []
    for seed in (1, 2):
        out = tmp_path / base / f"seed{seed}"
        for name in ("config.json", "results.json", "metrics.jsonl", "log.txt", "checkpoints/phase_0.pt",
                     "checkpoints/phase_1.pt"):
            assert (out / name).is_file(), name
        results = read_results(out)
        assert results["config"]["seed"] == seed
        assert json.loads((out / "config.json").read_text())["seed"] == seed
        assert [p["phase"] for p in results["phases"]] == [0, 1]
        orders.append(results["class_order"])
    assert orders[0] != orders[1]           # the seed also draws the class order


def test_prefix_names_the_folder_and_explicit_output_with_seed_list(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    raw = tiny_config(prefix="myrun", seed=[3, 4])
    write_config(tmp_path / "tiny.json", raw)
    assert main.main(["--config", "tiny.json", "--check"]) == 0
    out = capsys.readouterr().out.replace("\\", "/")
    h = config_hash(resolve_config(raw))
    assert f"output: logs/icarl/shapes/myrun-{h}/seed3" in out
    assert f"output: logs/icarl/shapes/myrun-{h}/seed4" in out
    write_config(tmp_path / "one.json", tiny_config(seed=5))
    assert main.main(["--config", "one", "--check", "--output", "somewhere"]) == 0
    assert "output: somewhere\n" in capsys.readouterr().out.replace("\\", "/")


def test_cli_resume_matches_the_uninterrupted_run(tmp_path, monkeypatch, capsys, tiny_reference):
    _, ref = tiny_reference
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config())
    out = tmp_path / "out"
    run(tiny_config(), out, stop_after_phase=0)            # an interrupted run
    assert main.main(["--config", "tiny", "--output", str(out), "--resume"]) == 0
    assert without_seconds(read_results(out)) == without_seconds(ref)


def test_cli_resume_into_a_folder_of_another_config_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    run(tiny_config(**FAST), out, stop_after_phase=0)
    write_config(tmp_path / "changed.json", tiny_config(**FAST, memory_size=40))
    capsys.readouterr()
    assert main.main(["--config", "changed", "--output", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot resume in") and "memory_size" in err and "Traceback" not in err
    assert len(read_results(out)["phases"]) == 1


def test_cli_diverged_loss_exits_1_and_keeps_earlier_phases(tmp_path, monkeypatch, capsys):
    from models.icarl import ICaRL

    original = ICaRL.loss

    def nan_in_phase_1(self, out, batch):
        loss, parts = original(self, out, batch)
        if "old_logits" in out:      # only with an old model: phase >= 1
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(ICaRL, "loss", nan_in_phase_1)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "tiny.json", tiny_config(**FAST))
    out = tmp_path / "out"
    assert main.main(["--config", "tiny", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Training diverged in phase 1, stage 'train', epoch 1" in err
    assert "Traceback" not in err
    results = read_results(out)
    assert [p["phase"] for p in results["phases"]] == [0]
    assert results["phases"][0]["cnn"]["top1"] > 0
