"""What the studies in miniature share: the data and pretraining they take options for, their held-out split,
and the pretraining each model of a study gets (equal steps on equal data)."""
import os

from supmae.core.options import Config, configuration, option
from supmae.pipelines.synthetic import default_dataset, write_synthetic
from supmae.training.config import PretrainConfig
from supmae.training.loop import pretrain


@configuration
class StudyOptions(Config):
    """The data a study trains and scores on, and the pretraining of each of its models."""
    data: str | None = option(None, "training data (image-text for the CLIP family)", exists=True,
                              shown="the captioned embedded dataset")
    val: str | None = option(None, "held-out data with the same classes", exists=True,
                             shown="the embedded dataset drawn with another seed")
    size: str = option("tiny", "model size", choices=("tiny", "small", "base"))
    img_size: int = option(64, "image side", at_least=32)
    batch_size: int = option(32, "images per step", at_least=2)
    steps: int = option(300, "pretraining steps per model", at_least=1)
    lr: float = option(1e-3, "pretraining's peak learning rate", above=0)
    workers: int | None = option(None, "loader processes", at_least=0, shown="cores - 1")


def splits(study: StudyOptions, out: str) -> tuple[str, str]:
    """(training data, held-out data): the given ones, or the embedded dataset and 200 images of it drawn with
    another seed, written under `out`."""
    train = study.data or default_dataset()
    val = study.val or write_synthetic(os.path.join(out, "val"), num_classes=10, images_per_class=20, seed=1,
                                       force=True)
    return train, val


def pretrained(study: StudyOptions, model: str, train: str, folder: str, **options) -> tuple[str, dict]:
    """(checkpoint, summary) of `model` pretrained as the study says into `folder`, continued if it was cut."""
    summary = pretrain(PretrainConfig.of(
        data=train, model=model, img_size=study.img_size, batch_size=study.batch_size, steps=study.steps,
        lr=study.lr, warmup_steps=max(1, study.steps // 10), workers=study.workers, output=folder, resume="auto",
        log_every=max(1, study.steps // 5), progress=False, tensorboard=False, **options))
    return summary["checkpoint"] or os.path.join(folder, f"checkpoint-{study.steps:08d}.pt"), summary
