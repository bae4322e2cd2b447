"""The pooling study in miniature: CLIP and MAE-CLIP with each pooling of the image tower (token, avg, max,
map), and SupMAE against MAE, each trained for the same steps on the same data and scored the same ways:
zero-shot classification (the CLIP family), k-NN and a linear probe on the frozen encoder.

    python -m benchmarks.pooling_study                      # the captioned embedded data, tiny models
    python -m benchmarks.pooling_study --data train.beton --val val.beton --size small --steps 20000

Writes study.json, table.md and study.png to --out. The MAE-CLIP paper (arXiv 2301.07836) found MAE-CLIP
4-6% ahead of CLIP with CLIP's default (token) pooling at 11.3M pairs, about 1% with average or max
pooling, and not ahead at 1.4B pairs; this measures the same comparison at the scale given.
"""
import datetime
import os
import sys

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from benchmarks.study import StudyOptions, pretrained, splits
from supmae.core.atomic import write_json
from supmae.core.options import Config, configuration, items, option, section
from supmae.evaluation.config import KnnConfig, LinearConfig, ZeroshotConfig
from supmae.evaluation.knn import eval_knn
from supmae.evaluation.linear import linear_probe
from supmae.evaluation.zeroshot import eval_zeroshot
from supmae.models.families import family_of
from supmae.profiling.measure import commit, device_name, versions

POOLS = ("token", "avg", "max", "map")


@configuration
class PoolingStudy(Config):
    """CLIP and MAE-CLIP by pooling, and SupMAE against MAE, at equal steps on equal data."""
    study: StudyOptions = section(StudyOptions)
    class_names: str | None = option(None, "zero-shot class names, one per line", exists=True,
                                     shown="as eval zeroshot finds them")
    pools: str = option(",".join(POOLS), "the poolings studied", choices=POOLS, listed=True)
    out: str | None = option(None, "folder for the runs, study.json, table.md and study.png",
                                shown="runs/pooling-study-<date>")


def _runs(cfg: PoolingStudy) -> list[tuple[str, str, str | None]]:
    """(label, model, pooling) of every run."""
    size = cfg.study.size
    runs: list[tuple[str, str, str | None]] = [(f"{family} {pool}", f"{family}_vit_{size}_patch16", pool)
                                               for family in ("clip", "maeclip") for pool in items(cfg.pools)]
    return runs + [("supmae avg", f"supmae_vit_{size}_patch16", "avg"), ("mae", f"mae_vit_{size}_patch16", None)]


def run_study(cfg: PoolingStudy) -> dict:
    code = commit()  # now: the study runs for hours, and the checkout may move on meanwhile
    out = cfg.out or f"runs/pooling-study-{datetime.date.today()}"
    os.makedirs(out, exist_ok=True)
    train, val = splits(cfg.study, out)
    rows = []
    for label, model, pool in _runs(cfg):
        checkpoint, summary = pretrained(cfg.study, model, train, os.path.join(out, label.replace(" ", "-")),
                                         pool=pool)
        row = dict(run=label, model=model, pool=pool, images_per_s=summary["images_per_s"])
        row["knn_top1"] = eval_knn(KnnConfig(checkpoint=checkpoint, train=train, val=val, workers=0, k=10))["top1"]
        # the official probe's lr (3.2: blr 0.1 at SupMAE's batch of 8192) at this study's batch
        row["linear_top1"] = linear_probe(LinearConfig(checkpoint=checkpoint, train=train, val=val, workers=0,
                                                       epochs=30, batch_size=cfg.study.batch_size,
                                                       blr=0.1 * 8192 / cfg.study.batch_size))["top1"]
        if family_of(model).uses_text:
            row["zeroshot_top1"] = eval_zeroshot(ZeroshotConfig(checkpoint=checkpoint, data=val,
                                                                class_names=cfg.class_names, workers=0))["top1"]
        rows.append(row)
        print(f"{label}: " + ", ".join(f"{k} {row[k]:.1%}" for k in ("zeroshot_top1", "knn_top1", "linear_top1")
                                       if k in row), flush=True)
    report = dict(device=device_name("cpu"), commit=code, versions=versions("timm", "open-clip-torch"),
                  config=dict(cfg.values(), data=train, val=val), rows=rows,
                  maeclip_minus_clip={pool: _gap(rows, pool) for pool in items(cfg.pools)})
    write_json(os.path.join(out, "study.json"), report)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table(report) + "\n")
    plot(report, os.path.join(out, "study.png"))
    print(table(report))
    return report


def _gap(rows: list[dict], pool: str) -> float | None:
    by = {(r["model"].split("_")[0], r["pool"]): r for r in rows}
    clip, maeclip = by.get(("clip", pool)), by.get(("maeclip", pool))
    return maeclip["zeroshot_top1"] - clip["zeroshot_top1"] if clip and maeclip else None


def table(report: dict) -> str:
    lines = ["| run | zero-shot top-1 | k-NN top-1 | linear top-1 |", "|---|---|---|---|"]
    for r in report["rows"]:
        zeroshot = f"{r['zeroshot_top1']:.1%}" if "zeroshot_top1" in r else "-"
        lines.append(f"| {r['run']} | {zeroshot} | {r['knn_top1']:.1%} | {r['linear_top1']:.1%} |")
    gaps = ", ".join(f"{pool} {gap:+.1%}" for pool, gap in report["maeclip_minus_clip"].items() if gap is not None)
    return "\n".join(lines) + f"\n\nMAE-CLIP minus CLIP, zero-shot top-1, by pooling: {gaps}"


def plot(report: dict, path: str) -> None:
    from matplotlib.figure import Figure
    rows = report["rows"]
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    ax = figure.subplots()
    width, metrics = 0.27, ("zeroshot_top1", "knn_top1", "linear_top1")
    for i, metric in enumerate(metrics):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [r.get(metric, 0) for r in rows], width,
               label=metric.replace("_top1", "").replace("zeroshot", "zero-shot").replace("knn", "k-NN"))
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=30, ha="right")
    ax.set(ylabel="top-1", ylim=(0, 1), title=f"{report['config']['size']} models, {report['config']['steps']} steps "
                                             f"at {report['config']['img_size']} px, on {report['device']}")
    ax.legend()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main(PoolingStudy, run_study)
