"""The experiment scripts' pure parts (exps/)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "exps"))

from localisation import box_overlap, box_scores  # noqa: E402


def test_box_overlap_and_scores_known_answers():
    truth = torch.tensor([[0, 10, 0, 10], [4, 8, 4, 8]])
    kept = torch.tensor([[0, 5, 0, 10], [0, 16, 0, 16]])
    assert box_overlap(kept, truth).tolist() == [50.0, 16.0]
    s = box_scores(kept, truth, size=16, ratio=4.0)
    assert s["coverage"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["iou"] == pytest.approx((50 / 100 + 16 / 256) / 2, abs=1e-4)
    assert s["area"] == pytest.approx((50 / 256 + 1.0) / 2, abs=1e-4)
    a = 50 / 256
    assert s["cost"] == pytest.approx(((a + (1 - a) / 4) + 1.0) / 2, abs=1e-4)


def test_localisation_restores_the_asked_phase(tmp_path):
    from conftest import run, tiny_config
    from localisation import restore

    out = tmp_path / "run"
    run(tiny_config(compression="cim", init_epochs=1, epochs=1), out)
    trainer, last = restore(out)
    assert last == 2 and trainer.phases()[last].last == 6
    trainer, last = restore(out, phase=0)
    assert last == 0 and len(trainer.memory.classes) == 2
    from utils.errors import UserError
    with pytest.raises(UserError, match="phases \\[0, 1, 2\\]"):
        restore(out, phase=7)


def _fake_tinyimagenet(root, classes=("n001", "n002"), train=4, val=2):
    """A tinyimagenet folder: ``train`` + ``val`` 16 px JPEGs per class (random pixels), with boxes."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)

    def save(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=g).numpy()).save(path)

    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(classes) + "\n")
    ann = []
    for c in classes:
        for i in range(train):
            save(root / f"train/{c}/images/{c}_{i}.JPEG")
        (root / f"train/{c}/{c}_boxes.txt").write_text("".join(f"{c}_{i}.JPEG\t2\t3\t{9 + i}\t12\n"
                                                               for i in range(train)))
        for i in range(val):
            save(root / f"val/images/val_{c}_{i}.JPEG")
            ann.append(f"val_{c}_{i}.JPEG\t{c}\t0\t{i}\t10\t15\n")
    (root / "val/val_annotations.txt").write_text("".join(ann))
    return root


def test_localisation_scores_a_streamed_run(tmp_path, monkeypatch, capsys):
    """A streamed dataset (in_memory false) holds its images as a lazy Dataset, not a tensor."""
    import json

    import localisation
    from conftest import run, tiny_config

    root = _fake_tinyimagenet(tmp_path / "tiny")
    out = tmp_path / "run"
    run(tiny_config(dataset="tinyimagenet", data_root=str(root), in_memory=False, shapes={},
                    image_size=16, input_size=16, init_cls=1, increment=1, memory_size=4,
                    compression="cim", init_epochs=1, epochs=1, batch_size=4), out)
    for split, per_class in (("test", 2), ("train", 3)):
        monkeypatch.setattr(sys, "argv", ["localisation.py", "--run", str(out), "--split", split,
                                          "--per-class", str(per_class)])
        localisation.main()
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert got["classes"] == 2 and got["images"] == 2 * per_class and got["split"] == split
        assert set(got["scores"]) == {"cam", "cim", "center@cam", "center@cim"}
        assert all(0 <= s["coverage"] <= 1 for s in got["scores"].values())


def _bench(monkeypatch, capsys, *argv):
    import json

    import bench_throughput

    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", *argv])
    bench_throughput.main()
    text = capsys.readouterr().out
    return json.loads(text[:text.rindex("}") + 1]), text


def test_bench_throughput_rows_plain_framework_and_compared(tmp_path, monkeypatch, capsys):
    """One row per arm, ratios against the plain loop of the same precision, the markdown table."""
    import json

    from conftest import tiny_config

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config(init_epochs=1)))
    report, text = _bench(monkeypatch, capsys, "--config", str(cfg), "--epochs", "1", "--threads", "1",
                          "--compare", "cim:compression=cim", "--compare", "broken:compression=bogus",
                          "--out", str(tmp_path / "r.json"))
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"plain loop", "plain + augment", "framework", "cim", "broken"}
    # A row that fails (here a bad value; on a GPU once a diverged warm-up epoch) says why and
    # leaves the other rows standing.
    broken = rows.pop("broken")
    assert broken["images_per_s"] is None and broken["error"].startswith("ConfigError") and "compression" in broken["error"]
    assert f"| broken | fp32 | {broken['error']} |" in text
    assert all(r["images_per_s"] > 0 and r["precision"] == "fp32" for r in rows.values())   # CPU: no bf16
    assert rows["cim"]["overrides"] == {"compression": "cim"}
    assert rows["framework"]["vs_plain"] == pytest.approx(
        rows["framework"]["images_per_s"] / rows["plain loop"]["images_per_s"], abs=1e-3)
    assert "| cim | fp32 |" in text and rows["cim"]["epoch_images_per_s"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == report["rows"]
    assert rows["cim"]["steady_images_per_s"] is None   # one epoch: no epoch after the first
    # 80 images in batches of 32: the plain loops train 64 (full batches), the framework 80 (its
    # loader keeps the last 16); seconds are rounded to 10 ms
    assert rows["plain loop"]["images_per_s"] * rows["plain loop"]["seconds"] == pytest.approx(64, rel=0.1)
    assert rows["framework"]["images_per_s"] * rows["framework"]["seconds"] == pytest.approx(80, rel=0.1)
    from utils.errors import UserError
    with pytest.raises(UserError, match="NAME:KEY=VALUE"):
        _bench(monkeypatch, capsys, "--config", str(cfg), "--compare", "compression=cim")


BAD_SCRIPT_INPUTS = [   # (script, argv, words of the one error line); each was a traceback, exit 1, or exit 0
    ("bench_throughput", ["--config", "smoke", "--set", "foo=1"], "Unknown config key 'foo'"),
    ("bench_throughput", ["--config", "nosuch"], "No config file 'nosuch'"),
    ("bench_throughput", ["--epochs", "0"], "--epochs is 0"),          # ZeroDivisionError
    ("bench_throughput", ["--epochs", "-1"], "--epochs is -1"),        # exit 0, negative images/s
    ("bench_throughput", ["--out", "{tmp}/afile/x.json"], "afile is a file"),   # after the whole benchmark
    ("bench_throughput", ["--compare", "x"], "--compare 'x'"),
    ("bench_cim_overhead", ["--config", "smoke", "--set", "foo=1"], "Unknown config key 'foo'"),
    ("bench_cim_overhead", ["--config", "smoke", "--policy", "bogus"], "'compression' is \"bogus\""),
    ("bench_bilevel", ["--config", "smoke", "--set", "foo=1"], "Unknown config key 'foo'"),   # every row failed, exit 0
    ("bench_bilevel", ["--config", "smoke", "--set", "num_meta_iters_per_cls=0.01"],
     "phase 0 runs no bilevel iteration"),                            # a SystemExit after the warm-up
    ("localisation", ["--run", "{tmp}/nonexistent"], "--run {tmp}/nonexistent does not exist"),
    ("localisation", ["--run", "{tmp}"], "config.json does not exist"),
    ("bench_stream_decode", ["--files", "{tmp}/afile", "--device", "cpu", "--sizes", "8", "--chunks", "0",
                             "--repeat", "1"], "Cannot read image"),   # a DataError traceback
    ("bench_stream_decode", ["--files", "{tmp}/none*.JPEG"], "no file matches"),
]


@pytest.mark.parametrize("script, argv, words", BAD_SCRIPT_INPUTS)
def test_a_bad_input_to_a_bench_or_analysis_script_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys,
                                                                                script, argv, words):
    """Each script's entry point (sys.exit(run_main(main))) turns a UserError into "error: ..." and exit
    2, before anything is timed or written."""
    import importlib

    from bench_throughput import run_main

    (tmp_path / "afile").write_text("not a JPEG")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    assert run_main(importlib.import_module(script).main) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]   # (after a warning of the decoder, where warnings go to stderr)
    assert last.startswith("error: ") and words.replace("{tmp}", str(tmp_path)) in last and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_bench_throughput_profile_gives_every_row_its_step_time_and_top_operators(tmp_path, monkeypatch, capsys):
    """--profile: steady-state steps of every row under torch.profiler (the framework's from the
    second epoch of a fresh stage), counted as the loader gave them; on a CPU there is no device
    busy fraction, and the host table names the convolutions the steps ran."""
    import json

    from conftest import tiny_config

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config(init_epochs=1)))
    report, text = _bench(monkeypatch, capsys, "--config", str(cfg), "--epochs", "1", "--threads", "1",
                          "--profile")
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"plain loop", "plain + augment", "framework"}
    for name, r in rows.items():
        prof = r["profile"]
        assert prof["ms_per_step"] > 0 and prof["device_busy"] is None, name
        assert prof["host_syncs"] is None and prof["host_sync_sites"] == {}, name   # counted on a GPU only
        assert "aten::convolution" in prof["top_host"] or "aten::mkldnn_convolution" in prof["top_host"], name
    # The loader's real steps: 80 images in batches of 32 are 2 full batches for the plain loops,
    # and for the framework also the last 16 (it drops only a batch under 2 samples).
    assert [rows[k]["profile"]["steps"] for k in ("plain loop", "plain + augment", "framework")] == [2, 2, 3]
    assert [rows[k]["profile"]["images"] for k in ("plain loop", "plain + augment", "framework")] == [64, 64, 80]
    assert "ms/step (profiled) | device busy |" in text
    assert "ms per step, device busy None (device None ms per step), host syncs None" in text
    # A profile that fails leaves the row's timings standing, with the reason in its place.
    import bench_throughput

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(bench_throughput, "profile_framework", boom)
    report, text = _bench(monkeypatch, capsys, "--config", str(cfg), "--epochs", "1", "--threads", "1", "--profile")
    framework = next(r for r in report["rows"] if r["row"] == "framework")
    assert framework["images_per_s"] > 0 and framework["profile"] == {"error": "RuntimeError: boom"}
    assert "framework (fp32): profile failed: RuntimeError: boom" in text


def test_bench_throughput_device_busy_is_the_union_of_kernel_intervals_known_answer():
    """Busy time = the union of the device's kernel/copy/memset intervals: overlapping kernels on
    two streams and a kernel nested in another count once; user-annotation ranges on the device
    (record_function, ProfilerStep#), host events and synchronisation records not at all."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    import bench_throughput

    def ev(start, end, device=DeviceType.CUDA, kind="kernel", annotation=False):
        return SimpleNamespace(device_type=device, activity_type=kind, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [
        ev(0, 10), ev(5, 15),                    # two streams, overlapping: busy 0..15
        ev(20, 30), ev(22, 25),                  # nested: busy 20..30
        ev(40, 41, kind="gpu_memcpy"), ev(41, 43, kind="gpu_memset"),   # back to back: 40..43
        ev(0, 100, kind="gpu_user_annotation", annotation=True),        # ProfilerStep# on the device
        ev(50, 90, kind="kernel", annotation=True),                     # an annotation whatever its type
        ev(60, 80, kind="cuda_sync"),            # a sync record, no work
        ev(0, 100, device=DeviceType.CPU, kind="cpu_op"),               # host op
        ev(95, 97, kind=None),                   # no activity type (older profilers): a device event counts
        ev(96, 99, kind=27),                     # a type that is no name: counts too
    ]
    intervals = bench_throughput.device_intervals(events)
    assert sorted(intervals) == [(0, 10), (5, 15), (20, 30), (22, 25), (40, 41), (41, 43), (95, 97), (96, 99)]
    assert bench_throughput.busy_us(intervals) == 15 + 10 + 3 + 4
    assert bench_throughput.busy_us([]) == 0
    assert bench_throughput.busy_us([(5, 5), (7, 6)]) == 0              # empty, reversed
    assert bench_throughput.busy_us([(0, 4), (1, 2), (3, 8), (8, 9)]) == 9
    assert bench_throughput.busy_us([(3, 8), (0, 4)]) == 8              # order does not matter


def test_bench_throughput_decode_counts_every_image_per_worker_setting(tmp_path, monkeypatch, capsys):
    import json

    from PIL import Image

    for c in ("a", "b"):
        for split, n in (("train", 6), ("val", 1)):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), (50 * i, 20, 90)).save(tmp_path / "data" / split / c / f"{i}.jpg")
    cfg = tmp_path / "folder.json"
    cfg.write_text(json.dumps({"dataset": "folder", "data_root": str(tmp_path / "data"), "image_size": 24,
                               "input_size": 24, "init_cls": 1, "increment": 1, "cache_dir": None}))
    report, _ = _bench(monkeypatch, capsys, "--config", str(cfg), "--decode", "--workers", "0", "2",
                       "--decode_images", "100")
    pillow = [r for r in report["decode"] if r["decoder"].startswith("pillow")]
    assert [r["workers"] for r in pillow] == [0, 2] and all(r["images"] == 12 for r in pillow)
    assert pillow[1]["images_per_s_per_worker"] == pytest.approx(pillow[1]["images_per_s"] / 2, abs=0.1)
    on_device = [r for r in report["decode"] if r["decoder"].startswith("stream_decode device")]
    assert [r["workers"] for r in on_device] == [0, 2] and all(r["images"] == 12 for r in on_device)


def test_bench_bilevel_times_eager_and_graphed_iterations_from_one_state(tmp_path, monkeypatch, capsys):
    """Two rows per PAU kernel on one trainer from the same φ, optimiser state and batches: on a
    CPU the graphed row runs eagerly, so its φ ends exactly where the eager row's does, after
    moving; the fused kernel's φ ends where autograd's does up to rounding."""
    import json

    import bench_bilevel
    from conftest import tiny_config

    cfg = tmp_path / "tiny.json"
    # 400 images: two epochs settle the BatchNorm statistics enough for finite eval-mode steps
    cfg.write_text(json.dumps(tiny_config(num_meta_iters_per_cls=0.5, meta_batch_size=4,
                                          shapes={"num_classes": 6, "train_per_class": 200, "test_per_class": 5})))
    monkeypatch.setattr(sys, "argv", ["bench_bilevel.py", "--config", str(cfg), "--epochs", "2", "--threads", "1",
                                      "--precision", "fp32", "--profile", "--pau_kernels", "autograd", "fused",
                                      "--out", str(tmp_path / "b.json")])
    bench_bilevel.main()
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["row"], r["pau_kernel"]) for r in rows] == [("eager", "autograd"), ("graphed", "autograd"),
                                                           ("eager", "fused"), ("graphed", "fused")]
    eager, graphed, fused_eager, fused_graphed = rows
    assert fused_eager["pau_kernels_run"] == "torch ops" and eager["pau_kernels_run"] == "autograd"
    assert fused_eager["iterations"] == fused_graphed["iterations"] == eager["iterations"]
    assert fused_eager["phi_max_abs_diff"] == fused_graphed["phi_max_abs_diff"]
    assert fused_eager["phi_max_abs_diff"] < 0.1 * fused_eager["phi_max_abs_move"]
    # the closed-form derivatives keep less for backward than autograd's Horner steps
    assert 0 < fused_eager["saved_for_backward_mb"] < eager["saved_for_backward_mb"]
    assert graphed["saved_for_backward_mb"] == eager["saved_for_backward_mb"]
    per_epoch = int(0.5 * tiny_config()["init_cls"])
    assert eager["iterations"] == graphed["iterations"] == 2 * per_epoch
    assert eager["skipped_nonfinite"] == graphed["skipped_nonfinite"] == 0 and graphed["graph_replays"] == 0 and graphed["graph_fallback"] is None
    assert graphed["phi_max_abs_diff"] == 0.0 and graphed["phi_max_abs_move"] > 0
    assert 0 < eager["bilevel_share"] < 1 and eager["train_ms_per_step"] > 0
    assert eager["profile"]["steps"] == per_epoch and "top_host" in eager["profile"]
    assert "eager" in capsys.readouterr().out


def test_bench_stream_decode_times_every_chunk_with_the_pixels_of_images_resized_alone(tmp_path, monkeypatch, capsys):
    import json

    import bench_stream_decode
    from PIL import Image

    for i in range(10):
        Image.new("RGB", (30 + 3 * i, 24), (20 * i, 60, 200 - 10 * i)).save(tmp_path / f"{i}.JPEG", quality=90)
    out = tmp_path / "sd.json"
    monkeypatch.setattr(sys, "argv", ["bench_stream_decode.py", "--files", str(tmp_path / "*.JPEG"), "--batch", "9",
                                      "--long_side", "40", "--sizes", "16", "24", "--chunks", "0", "12", "24",
                                      "--repeat", "1", "--small_batch", "4", "--device", "cpu", "--out", str(out)])
    bench_stream_decode.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["chunk_pixels_log2"]) for r in rows] == [(s, k) for s in (16, 24) for k in (0, 12, 24)]
    assert all(r["same_pixels"] and r["batch_invariant"] and r["images"] == 9 and r["distinct_shapes"] == 8
               and r["finish_ms"] > 0 for r in rows)
    from utils import stream_decode

    assert stream_decode.RESIZE_CHUNK_PIXELS["cpu"] == 1 << 18      # the bench puts the default back
    assert "finish ms" in capsys.readouterr().out


def test_bench_stream_decode_materialize_rows_compare_the_split_with_batches_of_256(tmp_path, monkeypatch, capsys):
    import json

    import bench_stream_decode
    from PIL import Image

    for i in range(40):
        Image.new("RGB", (12, 10), (i, 90, 200 - i)).save(tmp_path / f"{i:02d}.JPEG", quality=90)
    out = tmp_path / "m.json"
    monkeypatch.setattr(sys, "argv", ["bench_stream_decode.py", "--files", str(tmp_path / "*.JPEG"), "--sizes", "8",
                                      "--materialize", "5", "40", "--workers", "2", "--repeat", "1",
                                      "--out", str(out)])
    bench_stream_decode.main()
    rows = json.loads(out.read_text())["materialize"]
    assert [(r["images"], r["split_workers"], r["split_batch"]) for r in rows] == [(5, 0, 256), (40, 0, 256)]
    assert all(r["split_s"] > 0 and r["fixed_256_s"] > 0 and r["workers"] == 2 for r in rows)
    assert "vs batches of 256" in capsys.readouterr().out


def test_tile_folder_gives_a_dataset_with_every_training_image_n_times(tmp_path):
    """exps/tile_folder.py: a phase of N × the images per class for the GPU benches (links, not copies)."""
    from conftest import aspect_folder
    from tile_folder import tile
    from utils.datasets import load_dataset

    src = aspect_folder(tmp_path / "src", train_per_class=3, test_per_class=2, sizes=((12, 12),))
    assert tile(src, tmp_path / "x3", 3) == 4 * 3 * 3
    assert tile(src, tmp_path / "x3", 3) == 4 * 3 * 3          # again: the links are there already
    one = load_dataset("folder", str(src), image_size=12, progress=False, num_workers=0)
    three = load_dataset("folder", str(tmp_path / "x3"), image_size=12, progress=False, num_workers=0)
    assert len(three.train.labels) == 3 * len(one.train.labels)
    assert torch.equal(torch.bincount(three.train.labels), 3 * torch.bincount(one.train.labels))
    assert torch.equal(three.test.labels, one.test.labels) and (tmp_path / "x3" / "val").is_symlink()
    first = sorted((tmp_path / "x3" / "train" / "class0").iterdir())[0]
    assert first.is_symlink() and first.resolve().parent == (src / "train" / "class0").resolve()


def test_tile_folder_refuses_a_dst_inside_src_or_under_a_file(tmp_path, capsys):
    """DST equal to SRC or inside it used to get links written into the source dataset (exit 0); DST
    under a file ended in a NotADirectoryError traceback. Both: exit 2, nothing written."""
    from conftest import aspect_folder
    from tile_folder import main as tile_main

    src = aspect_folder(tmp_path / "src", train_per_class=1, test_per_class=1, sizes=((12, 12),))
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    (tmp_path / "afile").write_text("x")
    for dst, words in ((src, "inside"), (src / "train" / "tiled", "inside"), (tmp_path / "afile" / "x", "afile")):
        assert tile_main([str(src), str(dst), "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_make_oracle_replay_holds_out_images_and_never_removes_another_folder(tmp_path, capsys):
    """exps/make_oracle_replay.py: the first images of each class become the replay folder and leave the
    training copy; an --out holding anything but an earlier build is refused (it used to be removed
    whole: a mistyped --out . deleted the working tree)."""
    from make_oracle_replay import main as oracle

    from utils import replay_folder

    src = _fake_tinyimagenet(tmp_path / "tiny", train=4)
    out = tmp_path / "oracle"
    assert oracle(["--data_root", str(src), "--per_class", "1", "--out", str(out)]) == 0
    for c in ("n001", "n002"):
        assert len(replay_folder.class_files(str(out / "replay"), c)) == 1
        assert len(list((out / "data" / "train" / c / "images").iterdir())) == 3
    assert oracle(["--data_root", str(src), "--per_class", "2", "--out", str(out)]) == 0   # an earlier build
    assert len(list((out / "data" / "train" / "n001" / "images").iterdir())) == 2
    capsys.readouterr()
    precious = tmp_path / "work"
    (precious / "code").mkdir(parents=True)
    (precious / "notes.txt").write_text("keep")
    for out, data, words in ((precious, src, "holds other files"), (tmp_path / "elsewhere", tmp_path / "nowhere",
                                                                   "no wnids.txt"),
                             (out, out / "data", "contains --data_root")):
        assert oracle(["--data_root", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert (precious / "notes.txt").read_text() == "keep" and (precious / "code").is_dir()
    assert len(list((tmp_path / "oracle" / "data" / "train" / "n001" / "images").iterdir())) == 2


def test_make_oracle_replay_refuses_bad_classes_and_out_under_a_file_before_writing(tmp_path, capsys):
    """A --per_class holding out every training image of a class used to build a dataset without training
    images for it (exit 0); a wnids.txt naming a class without train/<wnid>/images, a non-UTF-8 wnids.txt
    and an --out under a file ended in tracebacks. All: exit 2 naming the problem, before anything is
    created or removed."""
    from make_oracle_replay import main as oracle

    src = _fake_tinyimagenet(tmp_path / "tiny", train=3)
    out = tmp_path / "oracle"
    (tmp_path / "afile").write_text("x")
    cases = [(["--per_class", "3"], "class n001"), (["--per_class", "5"], "it has 3"),
             (["--out", str(tmp_path / "afile" / "x")], "afile")]
    for extra, words in cases:
        assert oracle(["--data_root", str(src), "--out", str(out), "--per_class", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err
    (src / "wnids.txt").write_text("n001\nn002\nn999\n")
    assert oracle(["--data_root", str(src), "--out", str(out), "--per_class", "1"]) == 2
    err = capsys.readouterr().err
    assert "n999" in err and "train/n999/images" in err, err
    (src / "wnids.txt").write_bytes(b"n001\n\xff\xfe\n")
    assert oracle(["--data_root", str(src), "--out", str(out), "--per_class", "1"]) == 2
    err = capsys.readouterr().err
    assert "wnids.txt is not UTF-8" in err and "Traceback" not in err, err
    assert not out.exists()


def test_make_oracle_replay_refuses_a_name_longer_than_the_file_system_allows(tmp_path, capsys):
    """An --out or --data_root with a name over 255 bytes ended in an OSError (File name too long)
    traceback: Python 3.11's Path.exists raises it."""
    from make_oracle_replay import main as oracle

    src = _fake_tinyimagenet(tmp_path / "tiny", train=3)
    long = tmp_path / ("x" * 300)
    for data, out, arg in ((src, long, "--out"), (src, long / "sub", "--out"), (long, tmp_path / "o", "--data_root")):
        assert oracle(["--data_root", str(data), "--out", str(out), "--per_class", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {arg} cannot be used: ") and "File name too long" in err, err
    assert sorted(os.listdir(tmp_path)) == ["tiny"]


def test_make_oracle_replay_stopped_build_keeps_the_earlier_one_and_reruns(tmp_path, monkeypatch):
    """A build stopped part-way (Ctrl-C before the manifest) leaves the earlier build whole and needs no
    removal by hand: the next run replaces the stopped build's staging folder (it used to leave a
    half-written data/ and replay/ that every later run refused)."""
    import make_oracle_replay

    from utils import replay_folder

    src = _fake_tinyimagenet(tmp_path / "tiny", train=4)
    out = tmp_path / "oracle"
    assert make_oracle_replay.main(["--data_root", str(src), "--per_class", "1", "--out", str(out)]) == 0

    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(replay_folder, "write_manifest", stopped)
    with pytest.raises(KeyboardInterrupt):
        make_oracle_replay.main(["--data_root", str(src), "--per_class", "2", "--out", str(out)])
    monkeypatch.undo()
    assert (out / make_oracle_replay.STAGING).is_dir()
    assert len(replay_folder.class_files(str(out / "replay"), "n001")) == 1   # the earlier build, whole
    assert len(list((out / "data" / "train" / "n001" / "images").iterdir())) == 3
    assert make_oracle_replay.main(["--data_root", str(src), "--per_class", "2", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["data", "replay"]
    assert len(replay_folder.class_files(str(out / "replay"), "n001")) == 2
    assert len(list((out / "data" / "train" / "n001" / "images").iterdir())) == 2
    fresh = tmp_path / "fresh"   # stopped in a first build: only the staging folder is there
    (fresh / make_oracle_replay.STAGING / "data").mkdir(parents=True)
    assert make_oracle_replay.main(["--data_root", str(src), "--per_class", "1", "--out", str(fresh)]) == 0
    assert sorted(os.listdir(fresh)) == ["data", "replay"]
