"""Experiment trackers (dscl/trackers.py) with the real packages, no mocks: TensorBoard event files read
back with tensorboard's own EventAccumulator, W&B offline runs read back from their ``.wandb`` file as
wandb's own record protobufs, MLflow through its client on a SQLite (and a file) store."""

import contextlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest

from conftest import write_png_dataset
from dscl import dist, trackers
from dscl.config import ConfigError, dump_config, load_config, preset_changes
from dscl.run import RESUMABLE_KEYS, STAGE2_KEYS, MetricsLog, failed_start, key_allowed, prepare_run_dir
from dscl.trackers import TRACKER_FILES, TrackerError

# what stage 1 (two epochs of two logged steps), stage 2 (three epochs) and a resume write to metrics.jsonl
RECORDS = [
    {"stage": "pretrain", "epoch": 1, "step": 2, "lr": 0.01, "img_per_s": 250.0, "queue_fill": 64, "loss": 9.5,
     "loss_con": 5.0, "loss_pbsd": 3.0, "skipped_steps": 0},
    {"stage": "pretrain", "epoch": 1, "step": 4, "lr": 0.02, "img_per_s": 300.0, "queue_fill": 128, "loss": 9.0,
     "loss_con": 4.8, "loss_pbsd": 2.8, "skipped_steps": 1},
    {"stage": "pretrain_epoch", "epoch": 1, "wall_seconds": 3.0, "loss": 9.25, "loss_con": 4.9, "loss_pbsd": 2.9},
    {"stage": "pretrain", "epoch": 2, "step": 6, "lr": 0.015, "img_per_s": 310.0, "queue_fill": 128, "loss": 8.5,
     "loss_con": 4.5, "loss_pbsd": 2.6, "skipped_steps": 0},
    {"stage": "pretrain_epoch", "epoch": 2, "wall_seconds": 6.0, "loss": 8.5, "loss_con": 4.5, "loss_pbsd": 2.6},
    *({"stage": "classify", "epoch": e, "lr": 1.0, "train_loss": 2.0 / e, "val_balanced_top1": 50.0 + e}
      for e in (1, 2, 3)),
]
REPORT = {"top1": 80.3, "top5": 99.1, "top1_macro": 80.3, "many": 84.4, "medium": 72.2, "few": None,
          "variants": [{"method": "+ logit adjustment (tau=1)", "top1": 74.9, "top5": 98.0, "top1_macro": 74.9,
                        "many": 66.0, "medium": 81.6, "few": 87.3}],
          "test_agnostic": {"forward-50": 85.8, "uniform": 80.3, "backward-50": 79.4}}


@pytest.fixture(autouse=True)
def tracker_env(tmp_path, monkeypatch):
    """W&B offline with its folders in tmp_path (no network, no account), MLflow's artifacts there too;
    every tracker closed after the test."""
    for name in ("WANDB_DIR", "MLFLOW_TRACKING_URI", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.chdir(tmp_path)  # MLflow puts the artifacts of a SQLite store in ./mlruns
    yield
    trackers.close_all()


def make_run(tmp_path: Path, names: list[str], run: Path | None = None, extra: tuple[str, ...] = ()):
    """A run directory holding only a config.yaml that asks for ``names``."""
    run = run or tmp_path / "run"
    run.mkdir(parents=True)
    cfg = load_config("smoke", overrides=[f"log.trackers=[{','.join(names)}]",
                                          f"log.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra])
    dump_config(cfg, run / "config.yaml")
    return run, cfg


def log_everything(run: Path) -> Path:
    """Write RECORDS through MetricsLog, then the report with one plot; returns the plot."""
    from PIL import Image

    log = MetricsLog(run / "metrics.jsonl")
    for record in RECORDS:
        log.write(**record)
    plot = run / "plots" / "per_class_accuracy.png"
    plot.parent.mkdir()
    Image.new("RGB", (30, 20), (200, 40, 40)).save(plot)
    trackers.log_report(run, REPORT, [plot])
    return plot


def series(records, stage: str, key: str) -> list:
    """``(step, value)`` of ``key`` in the ``records`` of ``stage`` (the step: the global step, else the
    epoch); the values as ``pytest.approx`` (TensorBoard stores float32)."""
    return [(r.get("step", r["epoch"]), pytest.approx(float(r[key]), rel=1e-6)) for r in records
            if r["stage"] == stage]


def stage_values(stage: str, key: str) -> list:
    return series(RECORDS, stage, key)


# ----------------------------------------------------------------------------------------------
# reading the trackers' files back with their own readers


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def text(events, tag: str) -> str:
    return events.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def wandb_records(root: Path) -> list:
    """Every record of every ``run-*.wandb`` file under ``root`` (file order), as wandb's protobuf Records.

    The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
    blocks of chunks, each a 7-byte header (checksum, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(root.rglob("run-*.wandb")):
        data = path.read_bytes()
        ident, magic, version = struct.unpack("<4sHB", data[:7])
        assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), path
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:  # zero padding to the block's end
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
    return records


def wandb_view(root: Path, exits: int = 1, timeout: float = 60.0) -> dict:
    """The run, config, history rows, summary and metric definitions of the offline runs under ``root``,
    once ``exits`` runs have finished there: ``run.finish()`` returns when W&B's service has handled the
    exit record, which it writes to the file a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            view = _wandb_view(root)
        except Exception:  # noqa: BLE001 - a chunk still being written
            view = None
        if (view is not None and view["exits"] >= exits) or time.monotonic() > deadline:
            return view if view is not None else _wandb_view(root)
        time.sleep(0.2)


def _wandb_view(root: Path) -> dict:
    view: dict = {"runs": [], "config": {}, "history": [], "summary": {}, "metrics": [], "exits": 0}
    for record in wandb_records(root):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            view["runs"].append(record.run)
            view["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            view["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            view["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in record.history.item})
        elif kind == "summary":
            view["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in record.summary.update})
        elif kind == "metric":
            view["metrics"].append((record.metric.name or record.metric.glob_name, record.metric.step_metric))
        elif kind == "exit":
            view["exits"] += 1
    return view


def wandb_series(view: dict, key: str, step_key: str) -> list[tuple[int, float]]:
    return [(int(row[step_key]), row[key]) for row in view["history"] if key in row]


def mlflow_run(tmp_path: Path, run: Path, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=uri or f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_run(state["mlflow_run_id"])


def mlflow_series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------------------------
# the log section


def test_log_section_choices_and_which_commands_may_change_it():
    from dscl.cli.common import EVALUATE_KEYS

    cfg = load_config("smoke")
    assert cfg.log.trackers == ("jsonl",) and cfg.log.group is None and cfg.log.project == "dscl"
    assert trackers.wanted(cfg) == []
    both = load_config("smoke", overrides=["log.trackers=[jsonl,tensorboard,wandb,tensorboard]"])
    assert trackers.wanted(both) == ["tensorboard", "wandb"]  # jsonl is implied, a repeat counts once
    with pytest.raises(ConfigError, match=r"log.trackers must list only jsonl, tensorboard, wandb or mlflow"):
        load_config("smoke", overrides=["log.trackers=[neptune]"])
    with pytest.raises(ConfigError, match="log.project is empty"):
        load_config("smoke", overrides=["log.project="])
    # trackers change nothing a run computes: the preset's expected numbers still apply, and --resume,
    # dscl classify and dscl evaluate may change them
    assert preset_changes(load_config("smoke", overrides=["log.trackers=[mlflow]", "log.group=g"])) == []
    for keys in (RESUMABLE_KEYS, STAGE2_KEYS, EVALUATE_KEYS):
        assert all(key_allowed(f"log.{k}", keys) for k in ("trackers", "project", "group", "mlflow_uri"))


def test_a_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    trackers.require_trackers(load_config("smoke"))  # jsonl only: nothing is imported or checked
    for name in ("wandb", "tensorboard"):
        with pytest.raises(TrackerError, match=rf"pip install 'dscl-lt\[{name}\]'") as info:
            trackers.require_trackers(load_config("smoke", overrides=[f"log.trackers=[jsonl,{name}]"]))
        assert "pip install 'dscl-lt[trackers]'" in str(info.value) and isinstance(info.value, ConfigError)
    # a run that reaches its first record without the check stops there with the same message
    run, _ = make_run(tmp_path, ["wandb"])
    with pytest.raises(TrackerError, match=r"pip install 'dscl-lt\[wandb\]'"):
        MetricsLog(run / "metrics.jsonl").write(**RECORDS[0])
    assert not (run / "trackers.json").exists() and trackers.open_trackers() == {}


def test_mlflow_with_a_database_uri_needs_sqlalchemy(monkeypatch):
    import mlflow.tracking  # noqa: F401 - first: MLflow registers its stores by what it finds when imported

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(TrackerError, match=r"sqlite:///x.db.*pip install 'dscl-lt\[mlflow\]'"):
        trackers.require_trackers(load_config("smoke", overrides=["log.trackers=[mlflow]",
                                                                  "log.mlflow_uri=sqlite:///x.db"]))
    # an MLflow server needs only the client (and to answer: any HTTP answer, here a 404, counts)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with answering_server() as port:
        trackers.require_trackers(mlflow_cfg(port))


# ----------------------------------------------------------------------------------------------
# issue 28 item 8: an MLflow server that does not answer (only 127.0.0.1 is ever contacted)

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def silent_server():
    """A socket on 127.0.0.1 that takes connections (the kernel completes them) and never answers."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


@contextlib.contextmanager
def answering_server():
    """An HTTP server on 127.0.0.1 that answers every request with 404; yields its port."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def mlflow_cfg(port: int):
    return load_config("smoke", overrides=["log.trackers=[mlflow]", f"log.mlflow_uri=http://127.0.0.1:{port}"])


def test_an_mlflow_server_that_does_not_answer_is_refused_before_the_run_starts(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(trackers, "PROBE_SECONDS", 1.0)
    port = closed_port()
    t0 = time.monotonic()
    with pytest.raises(TrackerError, match=rf"the MLflow server http://127.0.0.1:{port} does not answer .*"
                                           r"log.mlflow_uri.*drop mlflow from log.trackers") as info:
        trackers.require_trackers(mlflow_cfg(port))
    assert "\n" not in str(info.value) and time.monotonic() - t0 < 5
    with silent_server() as server:
        t0 = time.monotonic()
        with pytest.raises(TrackerError, match="does not answer .*waited 1 s"):
            trackers.require_trackers(mlflow_cfg(server.getsockname()[1]))
        assert time.monotonic() - t0 < 5


def test_the_runs_mlflow_client_gives_up_in_seconds_and_the_users_settings_win(tmp_path, monkeypatch):
    """A server gone after the check: the client's requests are bounded (MLflow's defaults, 120 s and 7
    retries with backoff, hold a run ~4 minutes), only for dscl's calls, and never over the user's own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in trackers.MLFLOW_LIMITS:
        monkeypatch.delenv(name, raising=False)
    run, _ = make_run(tmp_path, ["mlflow"], extra=(f"log.mlflow_uri=http://127.0.0.1:{closed_port()}",))
    t0 = time.monotonic()
    with pytest.raises(TrackerError, match="mlflow could not start"):
        MetricsLog(run / "metrics.jsonl").write(**RECORDS[0])
    assert time.monotonic() - t0 < 30
    assert not any(name in os.environ for name in trackers.MLFLOW_LIMITS)  # set for dscl's calls only
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with trackers.mlflow_http_limits():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # the user's
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == trackers.MLFLOW_LIMITS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_a_signal_while_dscl_waits_for_the_mlflow_server_ends_it_at_once(tmp_path):
    """SIGTERM (SLURM's 120 s warning ends in SIGKILL) before training: exit code 3 in seconds, and no
    "finishing the current step" when no step runs."""
    import signal
    import subprocess

    from conftest import dscl_cmd

    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    with silent_server() as server:
        cmd = [*dscl_cmd(), "pretrain", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-progress",
               "--device", "cpu", "log.trackers=[mlflow]", f"log.mlflow_uri=http://127.0.0.1:{server.getsockname()[1]}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            server.settimeout(120)
            conn, _ = server.accept()  # dscl waits for the server's answer
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=60)
            took = time.monotonic() - t0
            conn.close()
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3 and took < 10, err
    assert "SIGTERM received" in err and "finishing the current step" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_jsonl_only_run_writes_no_tracker_file_and_imports_nothing(tmp_path, monkeypatch):
    for module in ("wandb", "mlflow", "torch.utils.tensorboard", "tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of a tracker package would fail
    run, _ = make_run(tmp_path, ["jsonl"])
    log_everything(run)
    assert len(MetricsLog(run / "metrics.jsonl").read()) == len(RECORDS)
    assert not any((run / name).exists() for name in TRACKER_FILES)
    assert trackers.open_trackers() == {}
    t0 = time.perf_counter()
    for _ in range(2000):  # a config.yaml stat per record, nothing else
        trackers.forward(run, RECORDS[0])
    assert time.perf_counter() - t0 < 1.0


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path, ["tensorboard", "wandb", "mlflow"])
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "is_main", lambda: False)
    log_everything(run)
    trackers.forward(run, RECORDS[0])  # called directly too
    assert not (run / "metrics.jsonl").exists()
    assert not any((run / name).exists() for name in TRACKER_FILES) and not (tmp_path / "mlflow.db").exists()
    assert trackers.open_trackers() == {}


# ----------------------------------------------------------------------------------------------
# each tracker, read back


def test_tensorboard_gets_the_records_the_report_and_the_config(tmp_path):
    run, _ = make_run(tmp_path, ["tensorboard"])
    log_everything(run)
    trackers.log_report(run, {"top1": 61.0, "many": 70.0}, split="val")  # `dscl evaluate --split val`
    trackers.close_all()
    events = tensorboard_events(run / "tensorboard")
    assert scalars(events, "val/top1") == [(0, pytest.approx(61.0))] and "val/few" not in events.Tags()["scalars"]
    for key in ("loss", "loss_con", "loss_pbsd", "lr", "img_per_s", "queue_fill", "skipped_steps"):
        assert scalars(events, f"pretrain/{key}") == stage_values("pretrain", key), key  # at the global step
    assert scalars(events, "pretrain_epoch/loss") == stage_values("pretrain_epoch", "loss")  # at the epoch
    assert scalars(events, "classify/train_loss") == stage_values("classify", "train_loss")
    assert scalars(events, "classify/val_balanced_top1") == stage_values("classify", "val_balanced_top1")
    assert scalars(events, "test/top1") == [(0, pytest.approx(80.3))]
    assert scalars(events, "test/many") == [(0, pytest.approx(84.4))] and "test/few" not in events.Tags()["scalars"]
    assert scalars(events, "test/logit_adjustment_tau_1/few") == [(0, pytest.approx(87.3))]
    assert scalars(events, "test/test_agnostic/forward-50") == [(0, pytest.approx(85.8))]
    assert "pretrain/step" not in events.Tags()["scalars"]  # the x axis, not a curve
    image = events.Images("test/plots/per_class_accuracy")[0]
    assert (image.width, image.height) == (30, 20)
    assert "forward-50 | uniform | backward-50" in text(events, "test/test_agnostic/text_summary")
    assert "trackers:\n  - tensorboard" in text(events, "config/text_summary")
    # the resolved config in the HParams dashboard
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["optim.epochs"].number_value == 2 and hparams["loss.loss"].string_value == "dscl"
    assert hparams["log.trackers"].string_value == '["tensorboard"]'


def test_wandb_offline_run_gets_the_records_the_report_and_the_config(tmp_path):
    run, cfg = make_run(tmp_path, ["wandb"])
    log_everything(run)
    trackers.close_all()
    view = wandb_view(run / "wandb")  # no WANDB_DIR: W&B's files stay in the run directory
    (meta,) = view["runs"]
    assert (meta.project, meta.display_name, meta.run_group, meta.job_type) == ("dscl", "run", "", "dscl+pbsd")
    assert meta.run_id == json.loads((run / "trackers.json").read_text())["wandb_id"]
    assert view["config"]["optim"]["epochs"] == 2 and view["config"]["log"]["trackers"] == ["wandb"]
    assert ("pretrain/*", "pretrain/step") in view["metrics"] and ("classify/*", "classify/epoch") in view["metrics"]
    for key in ("loss", "lr", "img_per_s", "queue_fill", "skipped_steps"):
        assert wandb_series(view, f"pretrain/{key}", "pretrain/step") == stage_values("pretrain", key), key
    assert wandb_series(view, "pretrain_epoch/loss", "pretrain_epoch/epoch") == stage_values("pretrain_epoch", "loss")
    assert wandb_series(view, "classify/train_loss", "classify/epoch") == stage_values("classify", "train_loss")
    summary = view["summary"]
    assert summary["test/top1"] == 80.3 and summary["test/medium"] == 72.2 and "test/few" not in summary
    assert summary["test/test_agnostic/uniform"] == 80.3 and summary["test/logit_adjustment_tau_1/many"] == 66.0
    image = next(row for row in view["history"] if "test/plots/per_class_accuracy/_type" in row)
    assert image["test/plots/per_class_accuracy/_type"] == "image-file"
    media = list((run / "wandb").rglob("media/images/test/plots/per_class_accuracy*.png"))
    assert len(media) == 1 and media[0].read_bytes() == (run / "plots" / "per_class_accuracy.png").read_bytes()
    table = next(row for row in view["history"] if "test/test_agnostic_table/_type" in row)
    assert table["test/test_agnostic_table/_type"] == "table-file" and table["test/test_agnostic_table/ncols"] == 3
    assert view["exits"] == 1  # finished


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_run_gets_the_records_the_report_and_the_config(tmp_path, monkeypatch, store):
    if store == "file":  # MLflow 3 keeps its file store behind this switch
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else (tmp_path / "mlruns-store").as_uri()
    run, _ = make_run(tmp_path, ["mlflow"], extra=(f"log.mlflow_uri={uri}", "log.project=lt-runs"))
    log_everything(run)
    trackers.close_all()
    client, found = mlflow_run(tmp_path, run, uri)
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert client.get_experiment(found.info.experiment_id).name == "lt-runs"
    tags = found.data.tags
    assert (tags["method"], tags["seed"], tags["variant"], "group" in tags) == ("dscl+pbsd", "0", "dscl+pbsd", False)
    params = found.data.params
    assert params["optim.epochs"] == "2" and params["loss.loss"] == "dscl" and params["log.trackers"] == '["mlflow"]'
    run_id = found.info.run_id
    for key in ("loss", "lr", "img_per_s", "queue_fill", "skipped_steps"):
        assert mlflow_series(client, run_id, f"pretrain/{key}") == stage_values("pretrain", key), key
    assert mlflow_series(client, run_id, "classify/train_loss") == stage_values("classify", "train_loss")
    metrics = found.data.metrics
    assert metrics["test/top1"] == 80.3 and metrics["test/test_agnostic/forward-50"] == 85.8
    assert "test/few" not in metrics and "pretrain/step" not in metrics
    assert [a.path for a in client.list_artifacts(run_id, "test/plots")] == ["test/plots/per_class_accuracy.png"]
    agnostic = Path(client.download_artifacts(run_id, "test/test_agnostic.json", str(tmp_path)))
    assert json.loads(agnostic.read_text()) == REPORT["test_agnostic"]


# ----------------------------------------------------------------------------------------------
# names, groups, later processes, failures


def test_compare_and_sweep_runs_are_grouped_by_their_folder(tmp_path):
    from dscl.trackers import run_info

    cfg = load_config("smoke")
    lone = run_info(tmp_path / "run", cfg)
    assert (lone.name, lone.group, lone.variant) == ("run", None, "dscl+pbsd")
    compare = tmp_path / "compare-fmnist"
    (compare / "runs").mkdir(parents=True)
    (compare / "compare-config.yaml").write_text("preset: smoke\n")
    info = run_info(compare / "runs" / "scl-seed2", cfg)
    assert (info.name, info.group, info.variant) == ("scl-seed2", "compare-fmnist", "scl")
    sweep = tmp_path / "alpha"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "sweep-config.yaml").write_text("preset: smoke\n")
    point = run_info(sweep / "runs" / "loss.alpha=0.2-seed0", cfg)
    assert (point.group, point.variant) == ("alpha", "loss.alpha=0.2")
    mine = load_config("smoke", overrides=["log.group=mine"])
    assert run_info(compare / "runs" / "scl-seed2", mine).group == "mine"  # log.group wins
    # and what W&B and MLflow record for a compared run
    run, _ = make_run(tmp_path, ["wandb", "mlflow"], run=compare / "runs" / "dscl+pbsd-seed1")
    MetricsLog(run / "metrics.jsonl").write(**RECORDS[0])
    trackers.close_all()
    (meta,) = wandb_view(run / "wandb")["runs"]
    assert (meta.display_name, meta.run_group, meta.job_type) == ("dscl+pbsd-seed1", "compare-fmnist", "dscl+pbsd")
    _, found = mlflow_run(tmp_path, run)
    assert found.data.tags["group"] == "compare-fmnist" and found.data.tags["variant"] == "dscl+pbsd"


def test_a_later_process_continues_the_same_runs_and_records_config_changes(tmp_path):
    """A resumed stage 1 or a later dscl classify (another process: here close_all, which main calls)
    logs into the same W&B / MLflow run and TensorBoard folder; a config change is recorded."""
    from dscl.run import record_stage2_config

    run, cfg = make_run(tmp_path, ["tensorboard", "wandb", "mlflow"])
    log = MetricsLog(run / "metrics.jsonl")
    for record in RECORDS[:5]:
        log.write(**record)
    trackers.close_all()
    state = json.loads((run / "trackers.json").read_text())
    cfg.eval.many_threshold = 50  # what `dscl classify eval.many_threshold=50` records before stage 2
    record_stage2_config(run, cfg)
    for record in RECORDS[5:]:
        log.write(**record)
    trackers.close_all()
    assert json.loads((run / "trackers.json").read_text()) == state
    events = tensorboard_events(run / "tensorboard")
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per process, read as one run
    assert scalars(events, "pretrain/loss") == stage_values("pretrain", "loss")
    assert scalars(events, "classify/train_loss") == stage_values("classify", "train_loss")
    event = json.loads(text(events, "events/config/text_summary").strip("`\n"))
    assert event == {"stage": "config", "changes": {"eval.many_threshold": [100, 50]}}
    view = wandb_view(run / "wandb", exits=2)
    assert {r.run_id for r in view["runs"]} == {state["wandb_id"]} and len(view["runs"]) == 2
    assert view["config"]["eval"]["many_threshold"] == 50 and view["exits"] == 2
    client, found = mlflow_run(tmp_path, run)
    assert found.data.tags["changed.eval.many_threshold"] == "50"
    assert mlflow_series(client, found.info.run_id, "pretrain/loss") == stage_values("pretrain", "loss")
    assert mlflow_series(client, found.info.run_id, "classify/train_loss") == stage_values("classify", "train_loss")
    assert len(client.search_runs([found.info.experiment_id])) == 1


def test_a_resumed_stage1_logs_each_step_once_to_every_tracker(tmp_path):
    """Issue 28 item 6: Ctrl-C in epoch 2, then --resume from the epoch-1 checkpoint: the resumed process logs
    step 6 again; metrics.jsonl and every tracker have it once (the trackers keep the value they have)."""
    from dscl.config import method_name
    from dscl.run import RunFacts, Stage1State, record_resume, save_stage1

    run, cfg = make_run(tmp_path, ["tensorboard", "wandb", "mlflow"])
    log = MetricsLog(run / "metrics.jsonl")
    for record in RECORDS[:4]:  # steps 2, 4, epoch 1's means, step 6 (4 steps per epoch)
        log.write(**record)
    trackers.close_all()  # Ctrl-C: main closes the trackers
    facts = RunFacts(method=method_name(cfg), backbone=cfg.model.backbone, num_classes=10, dim=cfg.model.dim,
                     global_batch=cfg.optim.batch_size, steps_per_epoch=4)
    save_stage1(run, Stage1State(epoch=1, epochs=2, finished=False, wall_seconds=3.0, facts=facts, data=None))
    record_resume(run, cfg, epochs_done=1)
    for record in RECORDS[3:5]:  # step 6 again, epoch 2's means
        log.write(**record)
    trackers.close_all()
    assert series(log.read("pretrain"), "pretrain", "loss") == stage_values("pretrain", "loss")
    events = tensorboard_events(run / "tensorboard")
    assert scalars(events, "pretrain/loss") == stage_values("pretrain", "loss")
    assert scalars(events, "pretrain_epoch/loss") == stage_values("pretrain_epoch", "loss")
    view = wandb_view(run / "wandb", exits=2)
    assert wandb_series(view, "pretrain/loss", "pretrain/step") == stage_values("pretrain", "loss")
    assert wandb_series(view, "pretrain_epoch/loss", "pretrain_epoch/epoch") == stage_values("pretrain_epoch", "loss")
    client, found = mlflow_run(tmp_path, run)
    assert mlflow_series(client, found.info.run_id, "pretrain/loss") == stage_values("pretrain", "loss")
    assert mlflow_series(client, found.info.run_id, "pretrain_epoch/loss") == stage_values("pretrain_epoch", "loss")


def test_new_trackers_in_config_yaml_take_effect_at_the_next_record(tmp_path):
    run, cfg = make_run(tmp_path, ["jsonl"])
    log = MetricsLog(run / "metrics.jsonl")
    log.write(**RECORDS[0])
    assert trackers.open_trackers() == {}
    cfg.log.trackers = ("jsonl", "tensorboard")  # e.g. `dscl pretrain --resume log.trackers=[tensorboard]`
    dump_config(cfg, run / "config.yaml")
    log.write(**RECORDS[1])
    assert trackers.open_trackers() == {os.path.abspath(run): ["tensorboard"]}
    trackers.close_all()
    assert scalars(tensorboard_events(run / "tensorboard"), "pretrain/loss") == [(4, pytest.approx(9.0))]


def test_a_tracker_that_fails_while_logging_is_dropped_and_training_goes_on(tmp_path, capsys):
    run, _ = make_run(tmp_path, ["tensorboard", "wandb"])
    log = MetricsLog(run / "metrics.jsonl")
    log.write(**RECORDS[0])
    session = trackers._session(run)
    wandb_tracker = next(t for t in session.trackers if t.name == "wandb")
    wandb_tracker.run.finish()  # W&B refuses to log into a finished run
    log.write(**RECORDS[1])
    assert "warning: log.trackers: wandb failed" in capsys.readouterr().err
    assert trackers.open_trackers() == {os.path.abspath(run): ["tensorboard"]}
    log.write(**RECORDS[3])
    trackers.close_all()
    assert len(log.read("pretrain")) == 3
    assert scalars(tensorboard_events(run / "tensorboard"), "pretrain/loss") == stage_values("pretrain", "loss")


def test_a_run_replaced_in_the_same_process_gets_new_tracker_runs(tmp_path):
    """--overwrite (e.g. `dscl compare` restarting a failed run) in a process that logged the old run."""
    run, cfg = make_run(tmp_path, ["tensorboard", "wandb"])
    MetricsLog(run / "metrics.jsonl").write(**RECORDS[0])
    old_id = json.loads((run / "trackers.json").read_text())["wandb_id"]
    prepare_run_dir(run, resume=False, overwrite=True)
    dump_config(cfg, run / "config.yaml")  # what pretrain writes first
    MetricsLog(run / "metrics.jsonl").write(**RECORDS[1])
    trackers.close_all()
    assert json.loads((run / "trackers.json").read_text())["wandb_id"] != old_id
    assert scalars(tensorboard_events(run / "tensorboard"), "pretrain/loss") == stage_values("pretrain", "loss")[1:2]
    (meta,) = wandb_view(run / "wandb")["runs"]
    assert meta.run_id != old_id


def test_tracker_files_are_run_files(tmp_path):
    """--overwrite removes them, and they do not stop a failed start from being replaced."""
    run, _ = make_run(tmp_path, ["tensorboard"])
    MetricsLog(run / "metrics.jsonl").write(**RECORDS[0])  # a start that stopped before its first checkpoint
    trackers.close_all()
    (run / "trackers.json").write_text("{}")
    assert (run / "tensorboard").is_dir() and failed_start(run)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    (run / "notes.txt").write_text("mine")
    prepare_run_dir(run, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------
# a real run


@pytest.mark.slow  # trains a tiny run (~20 s): both stages and the evaluation, through `dscl run`
def test_a_real_run_logs_to_every_tracker(tmp_path):
    from dscl.cli import main

    root = tmp_path / "data"
    write_png_dataset(root)
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "--out", str(out), "--no-progress", "--device", "cpu",
                 "--data-root", str(root), "data.dataset=split", f"data.train_list={root / 'train.txt'}",
                 f"data.test_list={root / 'test.txt'}", "data.image_size=32", "optim.batch_size=8",
                 "views.patch_size=16", "data.val_fraction=0.2", "log.trackers=[tensorboard,wandb,mlflow]",
                 f"log.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    assert trackers.open_trackers() == {}  # main closed them
    log = MetricsLog(out / "metrics.jsonl")
    report = json.loads((out / "report.json").read_text())

    def logged(stage: str, key: str) -> list:
        return series(log.read(stage), stage, key)

    events = tensorboard_events(out / "tensorboard")
    for key in ("loss", "lr", "img_per_s", "queue_fill"):
        assert scalars(events, f"pretrain/{key}") == logged("pretrain", key), key
    assert len(events.Scalars("classify/train_loss")) == 3
    assert events.Scalars("test/top1")[0].value == pytest.approx(report["top1"])
    assert events.Scalars("test/few")[0].value == pytest.approx(report["few"])
    assert sorted(events.Tags()["images"]) == ["test/plots/confidence_hist", "test/plots/confusion_matrix",
                                               "test/plots/per_class_accuracy", "test/plots/reliability",
                                               "test/plots/test_agnostic"]
    view = wandb_view(out / "wandb")
    assert wandb_series(view, "pretrain/loss", "pretrain/step") == logged("pretrain", "loss")
    assert view["summary"]["test/top1"] == pytest.approx(report["top1"]) and view["exits"] == 1
    client, found = mlflow_run(tmp_path, out)
    assert mlflow_series(client, found.info.run_id, "pretrain/queue_fill") == logged("pretrain", "queue_fill")
    assert found.data.metrics["test/few"] == pytest.approx(report["few"]) and found.info.status == "FINISHED"
    assert len(client.list_artifacts(found.info.run_id, "test/plots")) == 5
    assert found.data.metrics["test/calibration/ece"] == pytest.approx(report["calibration"]["ece"])


@pytest.mark.slow  # trains two tiny runs (~15 s) through `dscl compare`
def test_dscl_compare_groups_its_runs_side_by_side(tmp_path):
    from dscl.cli import main

    root = tmp_path / "data"
    write_png_dataset(root)
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "smoke", "--methods", "ce,dscl", "--seeds", "3", "--out", str(out),
            "--no-progress", "--device", "cpu", "--data-root", str(root), "data.dataset=split",
            f"data.train_list={root / 'train.txt'}", f"data.test_list={root / 'test.txt'}", "data.image_size=32",
            "optim.batch_size=8", "views.patch_size=16", "data.val_fraction=0.2", "optim.epochs=1",
            f"log.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main([*args, "log.trackers=[wandb,mlflow]"]) == 0
    for method in ("ce", "dscl"):
        run = out / "runs" / f"{method}-seed3"
        (meta,) = wandb_view(run / "wandb")["runs"]
        assert (meta.display_name, meta.run_group, meta.job_type) == (f"{method}-seed3", "cmp", method)
        _, found = mlflow_run(tmp_path, run)
        assert (found.data.tags["group"], found.data.tags["variant"], found.info.status) == ("cmp", method,
                                                                                             "FINISHED")
    # other trackers do not make it another comparison: the same command continues (here: reuses) it
    assert main([*args, "log.trackers=[tensorboard]"]) == 0
