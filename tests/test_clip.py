"""CLIP, FLIP and MAE-CLIP on the masked trunk: the losses, the fast path, several ranks, a short run."""
import json
import math
import os
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from test_cli import error_of
from test_distributed import WORLD, free_port

from supmae import create_model
from supmae.cli.main import main
from supmae.core.errors import SupmaeError
from supmae.evaluation.retrieval import recall_at
from supmae.evaluation.zeroshot import class_embeddings, class_names, names_file, templates
from supmae.models.clip import LOGIT_SCALE_MAX, contrastive_loss
from supmae.models.fast import apply_kernels
from supmae.pipelines.loader import LoaderSpec, create_loader, open_batches, ordered_batches
from supmae.pipelines.masking import MaskSampler, TextMaskSampler
from supmae.pipelines.sources import open_source
from supmae.pipelines.split import Split
from supmae.pipelines.synthetic import CLASS_NAMES, class_descriptions, write_synthetic
from supmae.pipelines.text import encode, special_tokens
from supmae.runtime.distributed import apply_ddp, init_world

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, text_width=32,
            text_depth=2, text_heads=2, proj_dim=16)
MAECLIP = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
MODELS = [("clip_vit_tiny_patch16", {}), ("clip_vit_tiny_patch16", dict(mask_ratio=0.5)),
          ("maeclip_vit_tiny_patch16", MAECLIP), ("maeclip_vit_tiny_patch16", dict(MAECLIP, text_reconstruction=False))]
CAPTIONS = ["a red circle", "two blue squares", "a green star on stripes", "three small pink rings",
            "a yellow cross", "an orange hexagon", "a purple triangle", "a cyan pentagon on dots"]


def pairs(size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.stack([torch.from_numpy(encode(CAPTIONS[i % len(CAPTIONS)]).tokens) for i in range(size)]).long()
    return torch.randn(size, 3, 32, 32, generator=generator), tokens


def inputs(model, images, tokens, rank=0, world_size=1) -> dict[str, Any]:
    split = Split(len(images), world_size)
    masking = MaskSampler(model.num_patches, model.mask_ratio, seed=0, device="cpu", rank=rank,
                          split=split)(len(images), 0) if model.mask_ratio else None
    text_mask = TextMaskSampler(0.5, special=special_tokens(), seed=0, device="cpu", rank=rank, split=split)(tokens, 0)
    return dict(masking=masking, tokens=tokens, text_mask=text_mask)


def test_infonce_is_the_hand_computed_symmetric_loss():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    scale = torch.tensor(7.0)
    logits = scale * image @ text.T
    by_hand = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(contrastive_loss(image, text, scale), by_hand)
    torch.testing.assert_close(contrastive_loss(text, image, scale), by_hand)  # symmetric


def test_the_logit_scale_starts_at_clips_and_is_clamped_at_100():
    model = create_model("clip_vit_tiny_patch16", **TINY)
    assert model.scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(math.exp(LOGIT_SCALE_MAX)) == pytest.approx(100)


def test_maeclip_loss_is_the_weighted_sum_and_a_zero_weight_drops_its_part():
    images, tokens = pairs()
    torch.manual_seed(0)
    model = create_model("maeclip_vit_tiny_patch16", **TINY, **MAECLIP, clip_weight=0.3, image_weight=2.0,
                         text_weight=0.7)
    out = model(images, **inputs(model, images, tokens))
    torch.testing.assert_close(out.loss, 0.3 * out.clip_loss + 2.0 * out.rec_loss + 0.7 * out.text_loss)
    assert all(part > 0 for part in (out.clip_loss, out.rec_loss, out.text_loss))
    for zero, kept in (("clip_weight", ("rec_loss", "text_loss")), ("image_weight", ("clip_loss", "text_loss")),
                       ("text_weight", ("clip_loss", "rec_loss"))):
        torch.manual_seed(0)
        weights = {**dict(clip_weight=0.3, image_weight=2.0, text_weight=0.7), zero: 0.0}
        m = create_model("maeclip_vit_tiny_patch16", **TINY, **MAECLIP, **weights)
        o = m(images, **inputs(m, images, tokens))
        weight_of = dict(clip_loss="clip_weight", rec_loss="image_weight", text_loss="text_weight")
        expected = sum(weights[weight_of[name]] * getattr(o, name) for name in kept)
        torch.testing.assert_close(o.loss, expected)


@pytest.mark.parametrize("name, options", MODELS)
def test_the_fast_path_has_the_reference_loss_and_gradients(name, options):
    images, tokens = pairs()
    torch.manual_seed(0)
    model = create_model(name, **TINY, **options)
    results = []
    for forward in (model, apply_kernels(model, "eager")):
        model.zero_grad()
        out = forward(images, **inputs(model, images, tokens))
        out.loss.backward()
        results.append((out.losses(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_losses, ref_grads), (fast_losses, fast_grads) = results
    assert ref_losses.keys() == fast_losses.keys() and ref_grads.keys() == fast_grads.keys()
    for key in ref_losses:
        torch.testing.assert_close(fast_losses[key], ref_losses[key], rtol=1e-5, atol=1e-6)
    for key in ref_grads:  # to float32 rounding of the tensor's scale: the two paths sum in other orders
        scale = ref_grads[key].abs().max().item()
        torch.testing.assert_close(fast_grads[key], ref_grads[key], rtol=0, atol=1e-5 * scale + 1e-8, msg=key)


def test_a_tiny_clip_learns_to_retrieve_its_own_captions():
    images, tokens = pairs()
    torch.manual_seed(0)
    model = create_model("clip_vit_tiny_patch16", **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        model(images, tokens=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        similarity = model.image_features(images) @ model.text_features(tokens).T
    assert recall_at(similarity)["r@1"] == 1.0 and recall_at(similarity.T)["r@1"] == 1.0


def test_recall_counts_a_tie_against_the_model():
    """Three images, whose captions are the same sentence twice and one other: ranked by position, an image
    whose caption is repeated finds the other copy at or above its own, so it is not retrieved at 1."""
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # captions 0 and 1 are the same
    images = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.0, 1.0]])
    similarity = images @ texts.T
    # by hand, image -> text: images 0 and 1 tie their own caption with the other copy (rank 1), image 2 is
    # first (rank 0): R@1 = 1/3, R@2 = 3/3
    assert recall_at(similarity, ks=(1, 2)) == {"r@1": pytest.approx(1 / 3), "r@2": 1.0}


def _clip_model():
    torch.manual_seed(0)
    return create_model("maeclip_vit_tiny_patch16", **TINY, **MAECLIP)


def _rank_gradients(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    _, device = init_world(torch.device("cpu"))
    model = _clip_model()
    forward = apply_ddp(apply_kernels(model, "eager"), device)
    images, tokens = pairs()
    mine = slice(rank * 4, rank * 4 + 4)  # a rank's rows of the global batch
    forward(images[mine], **inputs(model, images[mine], tokens[mine], rank, WORLD)).loss.backward()
    torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
               os.path.join(out, f"rank{rank}.pt"))
    _compiled_loss_is_eager(rank)
    torch.distributed.destroy_process_group()


def _compiled_loss_is_eager(rank):
    """torch.compile(fullgraph=True) traces the feature gather with its gradient (NCCL on GPUs, gloo here),
    and the compiled global loss and its gradients are eager's."""
    generator = torch.Generator().manual_seed(rank)
    features = [F.normalize(torch.randn(4, 8, generator=generator), dim=-1).requires_grad_() for _ in range(2)]
    scale = torch.tensor(3.0, requires_grad=True)
    results = []
    for loss_fn in (contrastive_loss, torch.compile(contrastive_loss, fullgraph=True)):
        loss = loss_fn(features[0], features[1], scale)
        results.append((loss, *torch.autograd.grad(loss, [*features, scale])))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_two_ranks_train_on_the_global_batch(tmp_path):
    """The contrastive loss over both ranks' features (gathered with their gradients), each rank scoring its
    rows: the gradients of one process on the global batch; compiled, the same loss (`_compiled_loss_is_eager`)."""
    mp.spawn(_rank_gradients, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model = _clip_model()
    images, tokens = pairs()
    apply_kernels(model, "eager")(images, **inputs(model, images, tokens)).loss.backward()  # the ranks' masks too
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ranks[0]) == set(single)
    worst = max((ranks[0][name] - grad).abs().max().item() / grad.abs().max().item() for name, grad in single.items())
    for name, grad in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], msg=name)
        torch.testing.assert_close(ranks[0][name], grad, rtol=0, atol=1e-5 * grad.abs().max().item() + 1e-8,
                                   msg=f"{name} (worst relative difference {worst:.1e})")


def test_a_short_run_on_the_embedded_data_classifies_zero_shot(tmp_path):
    """A tiny CLIP trained briefly on the captioned embedded data names its classes from their descriptions."""
    data = write_synthetic(str(tmp_path / "data"), num_classes=4, images_per_class=24, workers=1)
    source = open_source(data)
    torch.manual_seed(0)
    model = create_model("clip_vit_tiny_patch16", **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    spec = LoaderSpec(batch_size=32, img_size=32, mask_sampler=None, workers=1, text=True)
    with open_batches(create_loader("torch", source, spec)) as batches:
        for _ in range(150):
            batch = next(batches)
            model(batch.images, tokens=batch.tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    classes = class_embeddings(model, class_descriptions(4), templates("simple"), "cpu")
    correct = 0
    with torch.no_grad():
        for batch in ordered_batches("torch", source, img_size=32, batch_size=32, workers=0, device="cpu"):
            correct += ((model.image_features(batch.images) @ classes.T).argmax(1) == batch.labels).sum().item()
    assert correct / len(source) >= 0.25 + 0.25  # chance is 25%


def test_class_names_come_from_a_file_the_data_folder_or_the_folder_names(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    assert names_file(str(folder)) is None
    assert class_names(["0000_red_fox", "0001_grey-wolf"]) == (["red fox", "grey-wolf"], "the data's class names")
    (folder / CLASS_NAMES).write_text("a fox\na wolf\n")
    assert names_file(str(folder)) == str(folder / CLASS_NAMES)
    assert names_file(str(tmp_path / "data.beton")) is None  # beside a .beton: in the folder holding it
    (tmp_path / CLASS_NAMES).write_text("a fox\na wolf\n")
    assert names_file(str(tmp_path / "data.beton")) == str(tmp_path / CLASS_NAMES)
    assert class_names(["0000_red_fox", "0001_grey-wolf"], names_file(str(folder)))[0] == ["a fox", "a wolf"]
    with pytest.raises(SupmaeError, match="names 2 classes; the data has 3"):
        class_names(["a", "b", "c"], str(folder / CLASS_NAMES))
    # data labelled by number (shards) of which the highest class was cut: the full set's names are candidates
    assert class_names(["0"], str(folder / CLASS_NAMES))[0] == ["a fox", "a wolf"]


def test_zeroshot_names_a_beton_from_shards_by_the_file_beside_it(shards_with_names, tmp_path, capsys):
    beton, checkpoint = shards_with_names
    assert main(["eval", "zeroshot", "--checkpoint", checkpoint, "--data", beton, "--workers", "0", "--json",
                 str(tmp_path / "zs.json")]) == 0
    assert json.loads((tmp_path / "zs.json").read_text())["class_names"].endswith(CLASS_NAMES)
    assert "class names: " in capsys.readouterr().out
    os.remove(os.path.join(os.path.dirname(beton), CLASS_NAMES))
    assert main(["eval", "zeroshot", "--checkpoint", checkpoint, "--data", beton, "--workers", "0"]) == 0
    assert "warning: the classes of" in capsys.readouterr().err  # bare label numbers, said


@pytest.fixture
def shards_with_names(tmp_path):
    """A .beton converted from captioned, labelled shards, a class_names.txt beside it, and a CLIP checkpoint."""
    from test_text import jpeg, write_shard
    samples = [{"__key__": f"s{i}", "jpg": jpeg(i), "txt": f"a picture of thing {i % 2}", "cls": str(i % 2)}
               for i in range(8)]
    shard = write_shard(tmp_path / "shards" / "00000.tar", samples)
    beton = str(tmp_path / "things.beton")
    assert main(["convert", shard, beton, "--no-progress"]) == 0
    (tmp_path / CLASS_NAMES).write_text("red thing\nblue thing\n")
    assert main(["pretrain", "--data", beton, "--model", "clip_vit_tiny_patch16", "--img-size", "32",
                 "--batch-size", "4", "--steps", "1", "--workers", "0", "--no-progress", "--no-tensorboard",
                 "--output", str(tmp_path / "run")]) == 0
    return beton, str(tmp_path / "run" / "checkpoint-00000001.pt")


def test_zeroshot_retrieval_and_export_from_the_cli(tmp_path, capsys):
    data = write_synthetic(str(tmp_path / "data"), num_classes=2, images_per_class=8, workers=1)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", data, "--model", "clip_vit_tiny_patch16", "--img-size", "32",
                 "--batch-size", "8", "--steps", "2", "--workers", "0", "--no-progress", "--no-tensorboard",
                 "--output", str(out)]) == 0
    checkpoint = str(out / "checkpoint-00000002.pt")
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--checkpoint", checkpoint, "--data", data, "--workers", "0",
                 "--json", str(tmp_path / "zs.json")]) == 0
    with open(tmp_path / "zs.json") as f:
        result = json.load(f)
    assert result["images"] == 16 and result["num_classes"] == 2 and 0 <= result["top1"] <= result["top5"] == 1
    assert main(["eval", "retrieval", "--checkpoint", checkpoint, "--data", data, "--workers", "0"]) == 0
    assert "retrieval over 16 pairs: image->text r@1" in capsys.readouterr().out
    assert main(["export", checkpoint, str(tmp_path / "tower.safetensors")]) == 0  # the image tower, for timm
    from safetensors import safe_open
    with safe_open(str(tmp_path / "tower.safetensors"), "pt") as f:
        assert (f.metadata() or {})["global_pool"] == "token"  # the pooling CLIP trained with
    tensors = load_file(str(tmp_path / "tower.safetensors"))
    assert "norm.weight" in tensors and "fc_norm.weight" not in tensors
    assert main(["eval", "knn", "--checkpoint", checkpoint, "--train", data, "--val", data, "--workers", "0"]) == 0
    sup = tmp_path / "sup"
    assert main(["pretrain", "--data", data, "--model", "supmae_vit_tiny_patch16", "--img-size", "32",
                 "--batch-size", "8", "--steps", "1", "--workers", "0", "--no-progress", "--output", str(sup)]) == 0
    assert "has no text tower" in error_of(capsys, "eval", "zeroshot", "--checkpoint",
                                           str(sup / "checkpoint-00000001.pt"), "--data", data)
