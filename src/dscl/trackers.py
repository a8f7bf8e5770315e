"""Experiment trackers: what a run logs, mirrored to TensorBoard, Weights & Biases and MLflow.

``metrics.jsonl`` (the ``jsonl`` tracker) is always written. ``log.trackers`` adds any of
``tensorboard`` (event files in ``RUN/tensorboard``), ``wandb`` and ``mlflow``; each is an optional extra
(``pip install 'dscl-lt[tensorboard]'``, ``[wandb]``, ``[mlflow]``, or ``[trackers]`` for all three), imported
only by a run that asks for it. The stages know nothing of trackers: :meth:`dscl.run.MetricsLog.write`
hands every record it writes to :func:`forward`, and the evaluation hands its report to
:func:`log_report`. Both look up the trackers the run directory's ``config.yaml`` asks for; the file is
read once and again only when it changes (``--resume`` / ``dscl classify`` with new ``log.*`` keys), so a
jsonl-only run costs one ``stat`` per record.

What goes where (only rank 0 logs):

* a record ``{"stage": S, ...}`` -> scalars ``S/<key>`` for its numbers, at its ``step`` (stage 1's global
  step) or else its ``epoch``: stage 1's ``loss``, ``loss_con``, ``loss_pbsd``, ``lr``, ``img_per_s``,
  ``queue_fill``, ``skipped_steps`` ..., the stage-1 epoch means, stage 2's epochs. Records with other
  values (``resume`` / ``config`` changes, ``import``) become text events.
* the report -> summary metrics ``<split>/top1``, ``/many``, ``/medium``, ``/few`` ..., the post-hoc
  variants (``<split>/<variant>/top1`` ...), the test-agnostic table (``<split>/test_agnostic/<name>``
  and a table), and the report plots as images (``<split>/plots/<name>``).
* the resolved config -> hyperparameters when a tracker opens.

Names: the run is named after its directory; its group is ``log.group``, else the ``dscl compare`` /
``dscl sweep`` folder it lies in (``OUT/runs/<run>``), so a comparison's runs sit side by side; its
variant (W&B job type, MLflow tag) is what such a folder compares: the run name without ``-seed<N>``
(``dscl+pbsd``, ``loss.alpha=0.1``), else the method. What identifies the W&B / MLflow run is kept in
``RUN/trackers.json``, so a resumed stage 1 and a later ``dscl classify`` / ``dscl evaluate`` continue
the same run.

A tracker that cannot open raises :class:`TrackerError` (a missing package names its pip command; call
:func:`require_trackers` before training to fail before any work, an MLflow server that does not answer
included); one that fails while logging is dropped with a warning, never stopping the training. A
resumed stage 1 logs the steps after its checkpoint again: each tracker gets a stage-1 point once
(:data:`FORWARD_ONLY`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dscl import dist
from dscl.config import Config, ConfigError, config_from_file, flat_config, method_name
from dscl.io import write_json
from dscl.runtime import say

#: What the trackers write into a run directory: dscl treats them as run files (``--overwrite`` removes
#: them; they do not stop a failed start from being replaced).
TRACKER_FILES = ("tensorboard", "wandb", "trackers.json")
STATE_FILE = "trackers.json"
#: The module each optional tracker imports.
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: A run in ``OUT/runs/<run>`` is one of a comparison / sweep when ``OUT`` holds one of these.
GROUP_FILES = ("compare-config.yaml", "sweep-config.yaml")
#: The report's numbers logged as summary metrics (percentages).
REPORT_METRICS = ("top1", "top5", "top1_macro", "many", "medium", "few", "worst_class", "harmonic_mean",
                  "geometric_mean")
#: The scalar calibration metrics of a report row logged under ``<split>/calibration/`` (ECEs in percent, NLL in
#: nats, Brier 0-2; dscl.calibration.calibration_report's keys).
CALIBRATION_METRICS = ("ece", "adaptive_ece", "classwise_ece", "mce", "nll", "brier", "overconfidence",
                       "underconfidence")
#: Stage 1's records and the key of their x axis. Stage 1 only moves forward in a run, so a record at or below the
#: point a tracker already has comes from a resumed stage 1, which trains (and logs) the steps after its checkpoint
#: again: the tracker keeps the point it has (MLflow and W&B cannot replace one), and every step is there once.
#: What each tracker has is kept in trackers.json ("logged"), updated with each such record.
FORWARD_ONLY = {"pretrain": "step", "pretrain_epoch": "epoch"}
#: MLflow tracking URI schemes of its database store, which needs sqlalchemy and alembic.
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
#: Seconds an MLflow server (an http(s) tracking URI) has to answer before a run starts (:func:`require_trackers`).
PROBE_SECONDS = 5.0
#: What dscl's MLflow client waits for a server, set for its calls where the user has not set them (MLflow reads
#: them at each request): seconds per try (connect, then answer) and retries after the first (MLflow's defaults,
#: 120 s and 7 retries with a doubling backoff, hold a run ~4 minutes when the server is gone).
MLFLOW_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackerError(ConfigError):
    """A tracker of ``log.trackers`` that cannot be used: its package is missing (the message names the
    pip command) or it failed to start."""


def pip_command(name: str) -> str:
    return f"pip install 'dscl-lt[{name}]'"


def wanted(cfg: Config) -> list[str]:
    """The trackers besides jsonl that ``cfg`` asks for, each once, in order."""
    return list(dict.fromkeys(t for t in cfg.log.trackers if t != "jsonl"))


def _import(name: str, module: str, why: str = "") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackerError(
            f"log.trackers asks for {name}{why}, but {module.split('.')[0]} cannot be imported ({exc}); install it "
            f"with: {pip_command(name)} (or {pip_command('trackers')} for all three), or drop {name} from "
            f"log.trackers") from exc


def _mlflow_uri(cfg: Config) -> str:
    """The tracking URI MLflow will use: ``log.mlflow_uri``, else ``$MLFLOW_TRACKING_URI`` / MLflow's default."""
    if cfg.log.mlflow_uri:
        return cfg.log.mlflow_uri
    mlflow = _import("mlflow", "mlflow")
    return str(mlflow.get_tracking_uri())


def require_trackers(cfg: Config) -> None:
    """Raise :class:`TrackerError`, naming the pip command, when a tracker ``cfg.log.trackers`` asks for
    is not installed (MLflow with a database URI: also sqlalchemy and alembic). Nothing to do (and no
    import) for jsonl only. Call it on every rank before any work, so that a missing extra stops a run
    at once rather than at its first logged record. An MLflow server (an http(s) URI) that does not
    answer within :data:`PROBE_SECONDS` stops it too, before any work: a SIGTERM meanwhile ends the
    command at once (``dscl``'s main), where the first logged record would wait minutes inside the training."""
    for name in wanted(cfg):
        _require(name, cfg)
        if name == "mlflow":
            check_mlflow_server(_mlflow_uri(cfg))


def check_mlflow_server(uri: str, timeout: float | None = None) -> None:
    """Raise :class:`TrackerError` unless the server of an ``http(s)`` tracking ``uri`` answers within
    ``timeout`` seconds (default :data:`PROBE_SECONDS`). Any HTTP answer counts (``/health``, or an
    authenticating proxy's 401), and so does a TLS handshake this check cannot verify (MLflow's own
    certificate settings then apply); other URIs (files, databases, Databricks) are not checked."""
    import ssl
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return
    port = f":{parts.port}" if parts.port else ""
    server = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"  # without user:password@
    wait = PROBE_SECONDS if timeout is None else timeout
    try:
        with urllib.request.urlopen(f"{server}/health", timeout=wait):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:  # URLError (refused, no such host), a timeout: all OSErrors
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return
        waited = f"; waited {wait:g} s" if isinstance(reason, TimeoutError) else ""
        raise TrackerError(
            f"log.trackers: the MLflow server {server} does not answer ({reason or type(exc).__name__}{waited}); "
            f"start it or check the address (log.mlflow_uri, else MLFLOW_TRACKING_URI), or drop mlflow from "
            f"log.trackers (metrics.jsonl has every record)") from exc


@contextlib.contextmanager
def mlflow_http_limits() -> Iterator[None]:
    """:data:`MLFLOW_LIMITS` in the environment, where the user has not set them, while the block runs."""
    added = {k: v for k, v in MLFLOW_LIMITS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class _LimitedClient:
    """An ``MlflowClient`` whose every call runs with :func:`mlflow_http_limits`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with mlflow_http_limits():
                return attr(*args, **kwargs)

        return call


def _require(name: str, cfg: Config) -> Any:
    """Import tracker ``name``'s module (and, for MLflow's database store, sqlalchemy and alembic)."""
    module = _import(name, MODULES[name])
    if name == "mlflow":
        uri = _mlflow_uri(cfg)
        if _scheme(uri) in DB_SCHEMES:
            for extra in ("sqlalchemy", "alembic"):
                _import(name, extra, f" with the database tracking URI {uri}")
    return module


def _scheme(uri: str) -> str:
    """``sqlite`` for ``sqlite:///x.db``, ``postgresql`` for ``postgresql+psycopg2://...``, "" for a path."""
    head, sep, _ = uri.partition(":")
    return head.split("+")[0].lower() if sep else ""


# ----------------------------------------------------------------------------------------------
# what a run is called


@dataclass(frozen=True)
class RunInfo:
    """How the trackers name a run (see the module docstring)."""

    name: str
    group: str | None
    variant: str
    method: str
    seed: int
    tags: tuple[str, ...]


def run_info(run_dir: str | Path, cfg: Config) -> RunInfo:
    """Name, group, variant and tags of the run in ``run_dir`` (``cfg``: its config)."""
    path = Path(os.path.abspath(run_dir))
    folder = path.parent.parent
    in_group = path.parent.name == "runs" and any((folder / f).is_file() for f in GROUP_FILES)
    method = method_name(cfg)
    variant = re.sub(r"-seed\d+$", "", path.name) if in_group else method
    group = cfg.log.group or (folder.name if in_group else None)
    tags = tuple(dict.fromkeys([method, f"seed{cfg.optim.seed}", cfg.preset]))
    return RunInfo(name=path.name, group=group, variant=variant or method, method=method, seed=cfg.optim.seed,
                   tags=tags)


def _slug(text: str) -> str:
    """A metric-name part: ``+ logit adjustment (tau=1)`` -> ``logit_adjustment_tau_1``."""
    return re.sub(r"[^a-z0-9.]+", "_", text.lower()).strip("_") or "variant"


def _param(value: Any) -> str | int | float | bool:
    """A hyperparameter value every tracker takes: numbers, strings and booleans as they are, else JSON."""
    return value if isinstance(value, (str, int, float, bool)) else json.dumps(value)


# ----------------------------------------------------------------------------------------------
# the trackers


class _Tracker:
    """One tracker of one run: scalars at a step, text events, the report, close. ``fresh``: it opened a new
    run (or folder), which has no points yet."""

    name = ""
    fresh = True

    def flush(self) -> None:
        """Make what was logged so far survive a killed process (where the tracker buffers it)."""

    def scalars(self, stage: str, values: dict[str, float], step_key: str | None, step: int) -> None:
        raise NotImplementedError

    def event(self, stage: str, record: Mapping[str, Any], step: int, cfg: Config) -> None:
        raise NotImplementedError

    def report(self, prefix: str, summary: dict[str, float], table: dict[str, float | None],
               images: dict[str, Path]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _TensorBoard(_Tracker):
    """Event files in ``RUN/tensorboard`` (a resumed run adds a file there; TensorBoard reads them all):
    scalars, text, images, and the config in the HParams dashboard."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, cfg: Config, info: RunInfo, state: dict[str, Any]) -> None:
        tb = _require("tensorboard", cfg)
        self.fresh = not any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        self.writer = tb.SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=30)
        from torch.utils.tensorboard.summary import hparams

        params = {k: _param(v) for k, v in flat_config(cfg).items() if v is not None}
        # the HParams dashboard reads these report metrics from this run's scalars of the same names
        summaries = hparams(params, {f"test/{k}": 0.0 for k in ("top1", "many", "medium", "few")})
        file_writer = self.writer._get_file_writer()
        for summary in summaries:
            file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```", 0)
        self.writer.add_text("run", f"name `{info.name}`, group `{info.group}`, variant `{info.variant}`", 0)

    def scalars(self, stage: str, values: dict[str, float], step_key: str | None, step: int) -> None:
        for key, value in values.items():
            if key != step_key:  # it is the x axis
                self.writer.add_scalar(f"{stage}/{key}", value, step)

    def event(self, stage: str, record: Mapping[str, Any], step: int, cfg: Config) -> None:
        self.writer.add_text(f"events/{stage}", "```\n" + json.dumps(dict(record), indent=1, default=str) + "\n```",
                             step)

    def report(self, prefix: str, summary: dict[str, float], table: dict[str, float | None],
               images: dict[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for key, value in summary.items():
            self.writer.add_scalar(key, value, 0)
        if table:
            cells = " | ".join("—" if v is None else f"{v:.1f}" for v in table.values())
            self.writer.add_text(f"{prefix}/test_agnostic", f"| {' | '.join(table)} |\n|{'---:|' * len(table)}\n"
                                                            f"| {cells} |", 0)
        for tag, path in images.items():
            with Image.open(path) as img:
                self.writer.add_image(tag, np.asarray(img.convert("RGB")), 0, dataformats="HWC")
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB(_Tracker):
    """A W&B run (``WANDB_MODE=offline`` works without an account; its files go to ``RUN/wandb`` unless
    ``WANDB_DIR`` says otherwise). Each stage's scalars are plotted against its own step (``define_metric``)."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: Config, info: RunInfo, state: dict[str, Any]) -> None:
        wandb = _require("wandb", cfg)
        self.wandb = wandb
        kwargs: dict[str, Any] = {
            "project": cfg.log.project, "name": info.name, "group": info.group, "job_type": info.variant,
            "tags": list(info.tags), "config": cfg.to_dict(), "reinit": "create_new",
            # dscl's console output stays on the console; every number goes through log()
            "settings": wandb.Settings(console="off")}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(run_dir)
        self.fresh = not state.get("wandb_id")
        if not self.fresh:  # a resumed stage 1, or stage 2 in a new process: the same W&B run
            kwargs.update(id=state["wandb_id"], resume="allow")
        self.run = wandb.init(**kwargs)
        state["wandb_id"] = self.run.id
        self.defined: set[str] = set()

    def scalars(self, stage: str, values: dict[str, float], step_key: str | None, step: int) -> None:
        if step_key is not None and stage not in self.defined:
            self.run.define_metric(f"{stage}/{step_key}")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/{step_key}")
            self.defined.add(stage)
        self.run.log({f"{stage}/{k}": v for k, v in values.items()})

    def event(self, stage: str, record: Mapping[str, Any], step: int, cfg: Config) -> None:
        changes = record.get("changes")
        if isinstance(changes, Mapping) and changes:  # the config now in use
            sections = {str(k).split(".", 1)[0] for k in changes}
            current = cfg.to_dict()
            self.run.config.update({s: current[s] for s in sections if s in current}, allow_val_change=True)

    def report(self, prefix: str, summary: dict[str, float], table: dict[str, float | None],
               images: dict[str, Path]) -> None:
        self.run.summary.update(summary)
        logged: dict[str, Any] = {tag: self.wandb.Image(str(path)) for tag, path in images.items()}
        if table:
            logged[f"{prefix}/test_agnostic_table"] = self.wandb.Table(columns=list(table),
                                                                       data=[list(table.values())])
        if logged:
            self.run.log(logged)

    def close(self) -> None:
        self.run.finish()


class _MLflow(_Tracker):
    """An MLflow run in experiment ``log.project`` at ``log.mlflow_uri``: params (the flat config, when the
    run is created: MLflow params cannot change), metrics at their steps, tags (group, variant, method,
    seed), the plots as artifacts."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: Config, info: RunInfo, state: dict[str, Any]) -> None:
        _require("mlflow", cfg)  # with the database store's packages
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = _mlflow_uri(cfg)
        self.client = client = _LimitedClient(MlflowClient(tracking_uri=uri))
        self.run_id = ""
        if state.get("mlflow_run_id") and state.get("mlflow_uri") == uri:
            try:
                run = client.get_run(state["mlflow_run_id"])
                if run.info.lifecycle_stage == "active":
                    self.run_id = run.info.run_id
            except Exception:  # noqa: BLE001 - a run deleted or a store moved: start a new run
                self.run_id = ""
        self.fresh = not self.run_id
        if not self.run_id:
            experiment = client.get_experiment_by_name(cfg.log.project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(cfg.log.project))
            tags = {"method": info.method, "seed": str(info.seed), "variant": info.variant,
                    "run_dir": str(Path(os.path.abspath(run_dir)))}
            if info.group:
                tags["group"] = info.group
            self.run_id = client.create_run(experiment_id, run_name=info.name, tags=tags).info.run_id
            params = [Param(k, str(_param(v))) for k, v in flat_config(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                client.log_batch(self.run_id, params=params[i:i + 100])
        state.update(mlflow_run_id=self.run_id, mlflow_uri=uri)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def scalars(self, stage: str, values: dict[str, float], step_key: str | None, step: int) -> None:
        self._metrics({f"{stage}/{k}": v for k, v in values.items() if k != step_key}, step)

    def event(self, stage: str, record: Mapping[str, Any], step: int, cfg: Config) -> None:
        changes = record.get("changes")
        if isinstance(changes, Mapping):
            for key, change in changes.items():
                new = change[-1] if isinstance(change, (list, tuple)) and change else change
                self.client.set_tag(self.run_id, f"changed.{key}", str(_param(new)))
        self.client.log_dict(self.run_id, dict(record), f"events/{stage}-{step}-{int(time.time() * 1000)}.json")

    def report(self, prefix: str, summary: dict[str, float], table: dict[str, float | None],
               images: dict[str, Path]) -> None:
        self._metrics(summary, 0)
        if table:
            self.client.log_dict(self.run_id, table, f"{prefix}/test_agnostic.json")
        for path in images.values():
            self.client.log_artifact(self.run_id, str(path), f"{prefix}/plots")

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


OPENERS: dict[str, Callable[[Path, Config, RunInfo, dict[str, Any]], _Tracker]] = {
    "tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


# ----------------------------------------------------------------------------------------------
# one run directory's open trackers


class _Session:
    """The trackers a run directory's config asks for, opened together (read and written: trackers.json)."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.run_dir, self.cfg = run_dir, cfg
        self.info = run_info(run_dir, cfg)
        state = _read_state(run_dir)
        before = dict(state)
        self.trackers: list[_Tracker] = []
        try:
            for name in wanted(cfg):
                try:
                    self.trackers.append(OPENERS[name](run_dir, cfg, self.info, state))
                except TrackerError:
                    raise
                except Exception as exc:
                    raise TrackerError(f"log.trackers: {name} could not start for {run_dir}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        logged = state.get("logged")
        if not isinstance(logged, dict):
            logged = {}
        for tracker in self.trackers:
            if tracker.fresh:  # a new run: whatever trackers.json says it had belongs to an old one
                logged.pop(tracker.name, None)
        state["logged"] = logged
        self.state = state
        if state != before:
            write_json(run_dir / STATE_FILE, state)

    def scalars(self, stage: str, values: dict[str, float], step_key: str | None, step: int) -> None:
        """``values`` at ``step`` to every tracker; a stage-1 point (:data:`FORWARD_ONLY`) only to the trackers
        that do not have it yet."""
        if step_key is None or FORWARD_ONLY.get(stage) != step_key:
            self.each(lambda t: t.scalars(stage, values, step_key, step))
            return
        logged: dict[str, dict[str, int]] = self.state["logged"]
        took: list[str] = []

        def log(tracker: _Tracker) -> None:
            has = logged.setdefault(tracker.name, {})
            if stage in has and step <= has[stage]:
                return  # a resumed stage 1 logs it again: the tracker has this point
            tracker.scalars(stage, values, step_key, step)
            tracker.flush()  # before trackers.json says it has the point
            has[stage] = step
            took.append(tracker.name)

        self.each(log)
        if took:
            write_json(self.run_dir / STATE_FILE, self.state)

    def each(self, call: Callable[[_Tracker], None]) -> None:
        """``call`` on every tracker; one that fails is dropped with a warning (the training goes on)."""
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a dashboard's hiccup must not stop a training
                self.trackers.remove(tracker)
                say(f"warning: log.trackers: {tracker.name} failed ({type(exc).__name__}: {exc}); it logs "
                    f"nothing more for {self.run_dir} in this process (metrics.jsonl still has every record)")
                with contextlib.suppress(Exception):  # already reported
                    tracker.close()

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - closing the others matters more
                say(f"warning: log.trackers: closing {tracker.name} failed ({type(exc).__name__}: {exc})")


#: run directory (absolute) -> (config.yaml's stamp, its log config, its session or None for jsonl only)
_CACHE: dict[str, tuple[tuple[int, int, int] | None, Any, _Session | None]] = {}


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when ``path`` is rewritten, or None when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _session(run_dir: str | Path) -> _Session | None:
    """The open trackers of ``run_dir`` (None: jsonl only, or no config.yaml). Re-reads config.yaml when
    it changed: the same ``log`` section keeps the trackers open (they see the new config in events),
    another one closes and reopens them. Opening one run directory's trackers closes those of the others
    (``dscl compare`` / ``dscl sweep`` train their runs one after another in one process)."""
    key = os.path.abspath(run_dir)
    path = Path(key)
    stamp = _stamp(path / "config.yaml")
    cached = _CACHE.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[2]
    if stamp is None:
        return None
    try:
        cfg = config_from_file(path / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError):  # not this dscl's config: no trackers (metrics.jsonl has all)
        _CACHE[key] = (stamp, None, None)
        return None
    if cached is not None and cached[1] == cfg.log:
        session = cached[2]
        if session is not None:
            session.cfg = cfg
        _CACHE[key] = (stamp, cfg.log, session)
        return session
    if cached is not None and cached[2] is not None:
        cached[2].close()
    session = None
    if wanted(cfg):
        for other, (_, _, open_session) in list(_CACHE.items()):
            if other != key and open_session is not None:
                open_session.close()
                del _CACHE[other]
        session = _Session(path, cfg)
    _CACHE[key] = (stamp, cfg.log, session)
    return session


# ----------------------------------------------------------------------------------------------
# the entry points


def forward(run_dir: str | Path, record: Mapping[str, Any]) -> None:
    """Log one ``metrics.jsonl`` record of the run in ``run_dir`` to its trackers (rank 0 only)."""
    if not dist.is_main():
        return
    session = _session(run_dir)
    if session is None:
        return
    stage = str(record.get("stage") or "log")
    numbers = {k: float(v) for k, v in record.items()
               if k != "stage" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    step_key = "step" if "step" in numbers else "epoch" if "epoch" in numbers else None
    step = int(numbers[step_key]) if step_key else 0
    cfg = session.cfg
    if set(numbers) - {"step", "epoch"}:
        session.scalars(stage, numbers, step_key, step)
    if any(k != "stage" and k not in numbers for k in record):
        session.each(lambda t: t.event(stage, record, step, cfg))


def _calibration_metrics(calibration: Any, prefix: str, groups: bool = True) -> dict[str, float]:
    """``<prefix>/ece`` ... of a calibration object (:data:`CALIBRATION_METRICS`) and, with ``groups``,
    ``<prefix>/<group>/ece`` ... per Many / Medium / Few; None values and a missing object left out."""
    if not isinstance(calibration, Mapping):
        return {}
    out = {f"{prefix}/{k}": float(calibration[k]) for k in CALIBRATION_METRICS
           if isinstance(calibration.get(k), (int, float))}
    for group, entry in (calibration.get("groups") or {}).items() if groups else ():
        if isinstance(entry, Mapping):
            out.update({f"{prefix}/{group}/{k}": float(entry[k]) for k in CALIBRATION_METRICS
                        if isinstance(entry.get(k), (int, float))})
    return out


def report_metrics(report: Mapping[str, Any], prefix: str = "test") -> dict[str, float]:
    """The report's numbers as summary metrics: ``<prefix>/top1`` ..., ``<prefix>/<variant>/top1`` ...,
    ``<prefix>/test_agnostic/<distribution>``, the calibration metrics ``<prefix>/calibration/ece`` ...
    (per group ``<prefix>/calibration/many/ece`` ...), the temperature ``<prefix>/calibration/temperature`` and
    the metrics after temperature scaling ``<prefix>/calibration/temperature_scaled/ece`` ..., and each
    variant's ``<prefix>/<variant>/calibration/ece`` ... (None values left out)."""
    out = {f"{prefix}/{k}": float(report[k]) for k in REPORT_METRICS if isinstance(report.get(k), (int, float))}
    calibration = report.get("calibration")
    out.update(_calibration_metrics(calibration, f"{prefix}/calibration"))
    temp = calibration.get("temperature") if isinstance(calibration, Mapping) else None
    if isinstance(temp, Mapping) and isinstance(temp.get("temperature"), (int, float)):
        out[f"{prefix}/calibration/temperature"] = float(temp["temperature"])
        out.update(_calibration_metrics(temp, f"{prefix}/calibration/temperature_scaled", groups=False))
    for row in report.get("variants") or []:
        name = _slug(str(row.get("method", "")))
        out.update({f"{prefix}/{name}/{k}": float(row[k]) for k in REPORT_METRICS
                    if isinstance(row.get(k), (int, float))})
        out.update(_calibration_metrics(row.get("calibration"), f"{prefix}/{name}/calibration", groups=False))
    agnostic = report.get("test_agnostic")
    if isinstance(agnostic, Mapping):
        out.update({f"{prefix}/test_agnostic/{k}": float(v) for k, v in agnostic.items()
                    if isinstance(v, (int, float))})
    return out


def log_report(run_dir: str | Path, report: Mapping[str, Any], plots: Sequence[str | Path] = (), *,
               split: str = "test") -> None:
    """Log an evaluation report of the run in ``run_dir`` (rank 0 only): Many / Medium / Few and the rest
    as summary metrics, the test-agnostic table, and ``plots`` (PNG files) as images, all under
    ``<split>/`` (``test`` or ``val``)."""
    if not dist.is_main():
        return
    session = _session(run_dir)
    if session is None:
        return
    summary = report_metrics(report, split)
    agnostic = report.get("test_agnostic")
    table = dict(agnostic) if isinstance(agnostic, Mapping) else {}
    images = {f"{split}/plots/{Path(p).stem}": Path(p) for p in plots}
    session.each(lambda t: t.report(split, summary, table, images))


def close_run(run_dir: str | Path) -> None:
    """Finish the trackers open for ``run_dir`` and forget them: its run files are about to be removed
    (``--overwrite``), and the run that replaces it starts new tracker runs."""
    cached = _CACHE.pop(os.path.abspath(run_dir), None)
    if cached is not None and cached[2] is not None:
        cached[2].close()


def close_all() -> None:
    """Flush and finish every open tracker (W&B run finished, MLflow run FINISHED, event files closed).
    ``dscl``'s main calls it when a command ends; registered with :mod:`atexit` for library use."""
    sessions = [s for _, _, s in _CACHE.values() if s is not None]
    _CACHE.clear()
    for session in sessions:
        session.close()


def open_trackers() -> dict[str, list[str]]:
    """``{run directory: [tracker names]}`` of the trackers open in this process (for tests and checks)."""
    return {key: [t.name for t in s.trackers] for key, (_, _, s) in _CACHE.items() if s is not None}


atexit.register(close_all)
