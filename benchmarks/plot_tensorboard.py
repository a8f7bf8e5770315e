"""Plot the scalars of a run's TensorBoard event files, read back with TensorBoard's own reader.

The README's picture of what `log.trackers=[tensorboard]` records (a stand-in for a screenshot of the
TensorBoard UI, which needs a browser):

    python benchmarks/plot_tensorboard.py RUN/tensorboard --out docs/tensorboard_default_run.png

Needs the tensorboard extra (``pip install 'dscl-lt[tensorboard]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: (panel title, [(tag, label)]) in reading order
PANELS = [
    ("stage 1: loss (logged steps)", [("pretrain/loss", "loss"), ("pretrain/loss_con", "L_con (DSCL)"),
                                      ("pretrain/loss_pbsd", "L_pbsd")]),
    ("stage 1: learning rate", [("pretrain/lr", "lr")]),
    ("stage 1: images / s", [("pretrain/img_per_s", "img/s")]),
    ("stage 1: queue fill (entries)", [("pretrain/queue_fill", "queue fill")]),
    ("stage 2: classifier epochs", [("classify/train_loss", "train loss"),
                                    ("classify/val_balanced_top1", "val balanced top-1 % (right)")]),
]
REPORT = [("test/top1", "All"), ("test/many", "Many"), ("test/medium", "Medium"), ("test/few", "Few")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a run's tensorboard folder (RUN/tensorboard)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default=None, help="figure title (default: the run folder's name)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(args.logdir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag: str) -> tuple[list[int], list[float]]:
        points = events.Scalars(tag) if tag in tags else []
        return [p.step for p in points], [p.value for p in points]

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (title, curves) in zip(axes.flat, PANELS, strict=False):
        for i, (tag, label) in enumerate(curves):
            target = ax.twinx() if "(right)" in label else ax
            xs, ys = series(tag)
            target.plot(xs, ys, label=label, color=f"C{i}", lw=1.5)
            if target is not ax:
                target.set_ylabel(label.replace(" (right)", ""))
                target.legend(loc="center right", fontsize=8)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch" if title.startswith("stage 2") else "global step")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    ax = axes.flat[len(PANELS)]
    names, values = [], []
    for tag, label in REPORT:
        _, ys = series(tag)
        if ys:
            names.append(label)
            values.append(ys[-1])
    colours = {"All": "k", "Many": "C0", "Medium": "C1", "Few": "C3"}
    bars = ax.bar(names, values, color=[colours[n] for n in names])
    ax.bar_label(bars, fmt="%.2f")  # report.json keeps 2 decimals
    ax.set_ylim(0, 110)
    ax.set_title("report: test top-1 % (summary scalars)", fontsize=11)
    fig.suptitle(args.title or f"{args.logdir.resolve().parent.name}: TensorBoard scalars (EventAccumulator)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
