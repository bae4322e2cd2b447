"""SupMAE's robustness and few-shot claims in miniature: a SupMAE and an MAE encoder, pretrained for the same
steps on the same data, each scored by the official linear probe, by that probe under the 15 ImageNet-C
corruptions at 5 severities (made on the fly from a held-out split; mCE against AlexNet's published errors),
and by k-shot logistic regression on frozen features (mean and std over seeds).

    python -m benchmarks.transfer_study                        # the embedded data, tiny models
    python -m benchmarks.transfer_study --data train.beton --val val.beton --size base --steps 100000

Writes study.json and table.md to --out. The SupMAE paper reports the effect at ImageNet scale; this measures
the same comparison at the scale given, and says so.
"""
import datetime
import os
import sys

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from benchmarks.study import StudyOptions, pretrained, splits
from supmae.core.atomic import write_json
from supmae.core.options import Config, configuration, option, section
from supmae.evaluation.config import CORRUPTIONS, FewshotConfig, LinearConfig, RobustnessConfig
from supmae.evaluation.fewshot import eval_fewshot
from supmae.evaluation.linear import linear_probe
from supmae.evaluation.robustness import eval_robustness
from supmae.profiling.measure import commit, device_name, versions


@configuration
class TransferStudy(Config):
    """SupMAE against MAE at equal steps on equal data: linear probe, robustness and few-shot transfer."""
    study: StudyOptions = section(StudyOptions)
    probe_epochs: int = option(30, "the linear probe's epochs", at_least=1)
    shots: str = option("1,2,5,10", "few-shot k, comma-separated")
    seeds: int = option(5, "few-shot draws per k", at_least=1)
    out: str | None = option(None, "folder for the runs, study.json and table.md",
                             shown="runs/transfer-study-<date>")


def run_study(cfg: TransferStudy) -> dict:
    code = commit()  # now: the study runs for long, and the checkout may move on meanwhile
    out = cfg.out or f"runs/transfer-study-{datetime.date.today()}"
    os.makedirs(out, exist_ok=True)
    study = cfg.study
    train, val = splits(study, out)
    workers = 0 if study.workers is None else study.workers
    rows = []
    for family in ("supmae", "mae"):
        model, folder = f"{family}_vit_{study.size}_patch16", os.path.join(out, family)
        checkpoint, _ = pretrained(study, model, train, folder)
        # the official probe's lr (3.2: blr 0.1 at SupMAE's batch of 8192) at this study's batch
        probe = linear_probe(LinearConfig.of(checkpoint=checkpoint, train=train, val=val, workers=workers,
                                             epochs=cfg.probe_epochs, batch_size=study.batch_size,
                                             blr=0.1 * 8192 / study.batch_size, output=os.path.join(folder, "probe"),
                                             force=True))
        shifted = eval_robustness(RobustnessConfig.of(classifier=os.path.join(folder, "probe"), data=val,
                                                      corrupt=True, workers=workers))
        fewshot = eval_fewshot(FewshotConfig.of(checkpoint=checkpoint, train=train, val=val, shots=cfg.shots,
                                                seeds=cfg.seeds, workers=workers))
        rows.append(dict(model=model, linear_top1=probe["top1"], clean_top1=shifted["clean_top1"],
                         mce=shifted["mce"], corrupted_top1=_mean_corrupted(shifted["top1"]),
                         fewshot={k: (v["mean"], v["std"]) for k, v in fewshot["shots"].items()}))
        print(f"{model}: linear {probe['top1']:.1%}, mCE {shifted['mce']:.1f}", flush=True)
    report = dict(device=device_name("cpu"), commit=code, versions=versions("timm", "imagecorruptions-imaug"),
                  config=dict(cfg.values(), data=train, val=val), rows=rows)
    write_json(os.path.join(out, "study.json"), report)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table(report) + "\n")
    print(table(report))
    return report


def _mean_corrupted(top1: dict) -> float:
    """Top-1 averaged over the 15 corruptions and 5 severities."""
    values = [top for c in CORRUPTIONS for top in top1[c].values()]
    return sum(values) / len(values)


def table(report: dict) -> str:
    shots = list(report["rows"][0]["fewshot"])
    lines = ["| encoder | linear top-1 | top-1 corrupted (mean of 75) | mCE (lower is better) | "
             + " | ".join(f"{k}-shot top-1" for k in shots) + " |",
             "|---|---|---|---|" + "---|" * len(shots)]
    for r in report["rows"]:
        fewshot = " | ".join(f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in r["fewshot"].values())
        lines.append(f"| {r['model']} | {r['linear_top1']:.1%} | {r['corrupted_top1']:.1%} | {r['mce']:.1f} | "
                     f"{fewshot} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(TransferStudy, run_study)
