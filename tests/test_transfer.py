"""The paper's other two claims, measured: robustness (ImageNet-C and its mCE, the 200-class sets, corruptions
made on the fly) and few-shot transfer."""
import json
import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import error_of

from supmae.cli.main import main
from supmae.evaluation import robustness
from supmae.evaluation.classifier import load_classifier, save_finetuned, timm_vit
from supmae.evaluation.config import CORRUPTIONS, FewshotConfig
from supmae.evaluation.fewshot import draw_shots, eval_fewshot
from supmae.pipelines.sources import open_source

CLASSES = ["n01", "n02", "n03", "n04"]


@pytest.fixture(scope="module")
def constant(tmp_path_factory):
    """A fine-tuned-model file whose every weight is 0 but the head's bias: it always answers class n03."""
    vit = timm_vit("supmae_vit_tiny_patch16", 32, len(CLASSES))
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()
        vit.head.bias[2] = 1.0  # pyright: ignore[reportIndexIssue]
    path = str(tmp_path_factory.mktemp("classifier") / "model.safetensors")
    save_finetuned(path, vit, model="supmae_vit_tiny_patch16", img_size=32, classes=CLASSES)
    return path


def image_folder(root, counts: dict[str, int], size: int = 32):
    """`counts[class]` small RGB images of each class under root/class/."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def test_imagenet_c_gives_top1_per_corruption_and_severity_and_the_mce(capsys, constant, tmp_path):
    # severity s of each corruption holds s images of n03 (the classifier's answer) among 6: top-1 is s / 6
    root = tmp_path / "imagenet-c"
    for corruption in ("gaussian_noise", "fog"):
        for s in range(1, 6):
            image_folder(root / corruption / str(s), {"n01": 6 - s, "n02": 0, "n03": s, "n04": 0})
    assert main(["eval", "robustness", "--classifier", constant, "--data", str(root), "--workers", "0",
                 "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["kind"] == "ImageNet-C"
    for corruption in ("gaussian_noise", "fog"):
        assert result["top1"][corruption] == {str(s): pytest.approx(s / 6) for s in range(1, 6)}
    # by hand: each corruption's error summed over severities, over AlexNet's (given as its mean over them)
    error = sum(1 - s / 6 for s in range(1, 6))
    hand = {c: error / (5 * alexnet) for c, alexnet in (("gaussian_noise", 0.886428), ("fog", 0.819324))}
    assert result["ce"] == pytest.approx(hand)
    assert result["mce"] == pytest.approx(100 * (hand["gaussian_noise"] + hand["fog"]) / 2)
    assert "mCE" in capsys.readouterr().out


def test_a_200_class_set_is_scored_on_its_own_classes(constant, tmp_path):
    """ImageNet-A and -R: only their classes' logits count. Here n02 and n04: the constant answer n03 is out of
    the running, and of the two left (both 0) the first, n02, wins."""
    data = image_folder(tmp_path / "subset", {"n02": 3, "n04": 1})
    assert robustness.logit_indices(["n02", "n04"], CLASSES, data) == [1, 3]
    assert main(["eval", "robustness", "--classifier", constant, "--data", data, "--workers", "0",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["top1"] == pytest.approx(3 / 4)


def test_corruptions_made_on_the_fly_are_imagenet_cs_and_repeatable(constant, tmp_path):
    data = image_folder(tmp_path / "val", {"n01": 2, "n03": 2}, size=48)
    robustness._views = open_source(data)
    try:
        clean = robustness._corrupted_view((0, 32, None, None, 0))
        for corruption in CORRUPTIONS:
            views = [robustness._corrupted_view((0, 32, corruption, s, 0)) for s in (1, 5)]
            assert views[0].shape == clean.shape == (32, 32, 3) and views[0].dtype == np.uint8
            assert not np.array_equal(views[1], clean), corruption
            assert np.array_equal(views[1], robustness._corrupted_view((0, 32, corruption, 5, 0))), corruption
    finally:
        robustness._views = None
    results = []
    for workers in ("0", "2"):  # the noise is a function of (seed, corruption, severity, image) alone
        assert main(["eval", "robustness", "--classifier", constant, "--data", data, "--corrupt", "--corruptions",
                     "gaussian_noise,fog", "--severities", "1,5", "--workers", workers, "--json",
                     str(tmp_path / "r.json")]) == 0
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert results[0]["top1"] == results[1]["top1"] == {c: {"1": 0.5, "5": 0.5} for c in ("gaussian_noise", "fog")}
    assert results[0]["clean_top1"] == 0.5 and results[0]["mce"] is None  # CE needs all five severities


def test_bad_robustness_inputs_are_one_line_errors(capsys, constant, checkpoint, tmp_path):
    half = tmp_path / "half"
    image_folder(half / "gaussian_noise" / "1", {"n01": 1})
    image_folder(half / "holiday_photos", {"n01": 1})
    assert "is not ImageNet-C's layout" in error_of(capsys, "eval", "robustness", "--classifier", constant,
                                                    "--data", str(half))
    bad_severity = tmp_path / "c"
    image_folder(bad_severity / "fog" / "7", {"n01": 1})
    assert "should be the severities 1 to 5, found 7" in error_of(capsys, "eval", "robustness", "--classifier",
                                                                  constant, "--data", str(bad_severity))
    unmapped = image_folder(tmp_path / "other", {"n01": 1, "n99": 1})
    assert error_of(capsys, "eval", "robustness", "--classifier", constant, "--data", unmapped).endswith(
        "do not map to the classifier's: 'n99' is not among its 4 classes")
    assert "is a pretraining checkpoint, not a classifier" in error_of(capsys, "eval", "robustness",
                                                                       "--classifier", checkpoint, "--data", unmapped)
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert "is not a classifier supmae wrote" in error_of(capsys, "eval", "robustness", "--classifier",
                                                          str(tmp_path / "other.safetensors"), "--data", unmapped)
    assert "holds neither" in error_of(capsys, "eval", "robustness", "--classifier", str(tmp_path),
                                       "--data", unmapped)
    assert "--severities" in error_of(capsys, "eval", "robustness", "--classifier", constant, "--data", unmapped,
                                      "--corrupt", "--severities", "6")


def test_a_classifier_file_rebuilds_what_was_saved(constant):
    model = load_classifier(constant, "cpu")
    assert model.classes == CLASSES and model.img_size == 32
    logits = model.module(torch.randn(2, 3, 32, 32))
    assert torch.equal(logits, torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2))


def test_fewshot_reports_mean_and_std_over_seeds(capsys, checkpoint, synth_folder, tmp_path):
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    picks = [draw_shots(labels, 2, seed) for seed in range(3)]
    assert all(sorted(labels[p].tolist()) == [0, 0, 1, 1, 2, 2] for p in picks)
    assert len({tuple(p.tolist()) for p in picks}) > 1  # each seed its own draw
    result = eval_fewshot(FewshotConfig.of(checkpoint=checkpoint, train=synth_folder, val=synth_folder,
                                           shots="1,4", seeds=3, workers=0))
    for k in ("1", "4"):
        row = result["shots"][k]
        assert len(row["top1"]) == 3 and row["mean"] == pytest.approx(statistics.fmean(row["top1"]))
        assert row["std"] == pytest.approx(statistics.stdev(row["top1"]))
    assert "4-shot top-1:" in capsys.readouterr().out
    # 12 images per class: 13 shots cannot be drawn
    assert error_of(capsys, "eval", "fewshot", "--checkpoint", checkpoint, "--train", synth_folder, "--val",
                    synth_folder, "--shots", "1,13").endswith("has 12 training image(s)")
    assert "--shots: give positive whole numbers" in error_of(capsys, "eval", "fewshot", "--checkpoint",
                                                              checkpoint, "--train", synth_folder, "--val",
                                                              synth_folder, "--shots", "0,x")
