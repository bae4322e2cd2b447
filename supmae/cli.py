"""`supmae` command line: every user error is one line on stderr and a non-zero exit."""
import argparse
import sys

from supmae.errors import SupmaeError


class _Parser(argparse.ArgumentParser):
    """One-line errors, and every option's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _number(low: float, high: float = float("inf"), open_low: bool = True, open_high: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"{value} is out of range")
        return value
    return parse


def _add_synth(sub):
    p = sub.add_parser("synth", help="write the embedded synthetic dataset as an image folder of JPEGs",
                       description="Write a synthetic ImageFolder dataset of real JPEG files with learnable classes.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--classes", type=_count(2), default=10, help="number of classes")
    p.add_argument("--images-per-class", type=_count(1), default=100, help="images per class")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--workers", type=_count(1), default=None, help="processes; unset: all cores")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")


def _add_convert(sub):
    from supmae.pipelines.convert import WRITE_MODES, ConvertOptions
    d = ConvertOptions()
    p = sub.add_parser("convert", help="convert an image folder or file list to an FFCV .beton",
                       description="Convert an image folder (root/<class>/...) or a CSV/TSV list of path,label "
                                   "to an FFCV .beton, with a JSON sidecar (classes, counts, options) and a "
                                   "report of the files skipped.")
    p.add_argument("src", metavar="SRC", help="image folder, or .csv/.tsv file list")
    p.add_argument("out", metavar="OUT", help="the .beton to write")
    p.add_argument("--write-mode", choices=WRITE_MODES, default=d.write_mode,
                   help="how images are stored: JPEG, raw pixels, a random proportion as JPEG, or JPEG when "
                        "larger than --smart-threshold bytes raw")
    p.add_argument("--max-res", dest="max_resolution", metavar="PIXELS", type=_count(0), default=d.max_resolution,
                   help="resize so the longest side is at most this (suits 224-pixel training); 0 keeps the "
                        "original size")
    p.add_argument("--quality", dest="jpeg_quality", metavar="Q", type=_count(1), default=d.jpeg_quality,
                   help="JPEG quality, 1-100")
    p.add_argument("--compress-probability", metavar="P", type=_number(0, 1, open_low=False, open_high=False),
                   default=d.compress_probability, help="share stored as JPEG in proportion mode")
    p.add_argument("--smart-threshold", metavar="BYTES", type=_count(0), default=d.smart_threshold,
                   help="smart mode: raw bytes above which an image is stored as JPEG")
    p.add_argument("--workers", metavar="N", type=_count(1), default=None, help="processes; unset: all cores")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def _add_shared(p, d) -> None:
    """The options a training run and its profile share: what is read, by what, on what, into what."""
    from supmae.pipelines.loader import ENGINES
    from supmae.train import COMPILE_MODES
    p.add_argument("--config", metavar="FILE",
                   help="a TOML or YAML table of these options (as option = value); the command line overrides it")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="image folder, CSV/TSV file list or .beton (default: the embedded synthetic "
                                     "dataset)")
    data.add_argument("--loader", choices=("auto", *ENGINES), default=d.loader,
                      help="decoding engine (ffcv reads .beton files only); auto: ffcv for a .beton, torch otherwise")
    data.add_argument("--order", choices=("random", "quasi_random"), default=d.order,
                      help="sample order; quasi_random (ffcv) reads pages in near-random order, for data "
                           "larger than memory")
    data.add_argument("--process-cache", dest="os_cache", action="store_false",
                      help="ffcv: cache pages in the process instead of relying on the OS page cache")
    data.add_argument("--workers", type=_count(0), default=None, help="loader processes (default: cores - 1)")
    data.add_argument("--seed", type=_count(0), default=d.seed)
    hardware = p.add_argument_group("hardware")
    hardware.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    hardware.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=d.precision,
                          help="auto: bf16 on GPU, fp32 on CPU; fp16 uses a GradScaler")
    hardware.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                          help="torch.compile the model (default: on for GPU, off for CPU)")
    hardware.add_argument("--compile-mode", choices=COMPILE_MODES, default=d.compile_mode,
                          help="torch.compile's mode; reduce-overhead replays the step as CUDA graphs; auto: "
                               "reduce-overhead on one GPU with --accum-iter 1, default otherwise")
    mdl = p.add_argument_group("model and objective")
    mdl.add_argument("--model", default=d.model, help="a name from `supmae models`")
    mdl.add_argument("--batch-size", type=_count(1), default=d.batch_size, help="images per device per micro-batch")
    mdl.add_argument("--accum-iter", type=_count(1), default=d.accum_iter, help="micro-batches per optimizer step")
    mdl.add_argument("--img-size", type=_count(1), default=d.img_size)
    mdl.add_argument("--mask-ratio", type=_number(0, 1), default=d.mask_ratio)
    mdl.add_argument("--pool", choices=("avg", "token", "max", "map"), default=d.pool,
                     help="feature pooling for the classification branch")
    mdl.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=d.norm_pix_loss)
    mdl.add_argument("--cls-loss-ratio", type=_number(0, open_low=False), default=d.cls_loss_ratio)
    mdl.add_argument("--temperature", type=_number(0), default=d.temperature)


def _add_pretrain(sub):
    from supmae.train import PretrainConfig
    d = PretrainConfig()
    p = sub.add_parser("pretrain", help="pretrain a SupMAE/MAE model",
                       description="Pretrain a SupMAE (or MAE) ViT with the official recipe as defaults.")
    run = p.add_argument_group("run")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_number(0), default=None, help="run length in epochs (default 400)")
    length.add_argument("--steps", type=_count(1), default=None, help="run length in optimizer steps")
    run.add_argument("--output", default=d.output, help="folder for checkpoints, metrics and config")
    run.add_argument("--checkpoint-every", type=_count(0), default=d.checkpoint_every,
                     help="steps between checkpoints (0: only at the end)")
    run.add_argument("--keep-checkpoints", type=_count(1), default=d.keep_checkpoints)
    run.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint, or the newest in --output")
    run.add_argument("--log-every", type=_count(1), default=d.log_every, help="steps between metrics lines")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    run.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                     help="write metrics.jsonl only, no TensorBoard scalars")
    run.add_argument("--sync-bn", action="store_true",
                     help="several ranks (torchrun): the classification head's BatchNorm over the global batch")
    _add_shared(p, d)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--blr", type=_number(0), default=d.blr, help="base lr: lr = blr * effective batch / 256")
    opt.add_argument("--lr", type=_number(0), default=None, help="absolute lr (overrides --blr)")
    opt.add_argument("--min-lr", type=_number(0, open_low=False), default=d.min_lr)
    opt.add_argument("--weight-decay", type=_number(0, open_low=False), default=d.weight_decay)
    opt.add_argument("--warmup-epochs", type=_number(0, open_low=False), default=d.warmup_epochs)
    opt.add_argument("--warmup-steps", type=_count(0), default=None, help="overrides --warmup-epochs")


def _add_profile(sub):
    from supmae.profiler import ProfileOptions
    from supmae.train import PretrainConfig
    d, o = PretrainConfig(), ProfileOptions()
    p = sub.add_parser("profile", help="measure loader, step and end to end; name what bounds the run",
                       description="Measure, with a run's configuration, the loader alone, the training step "
                                   "alone and the real loop; print a table and a verdict naming the stage that "
                                   "bounds the run, and write a JSON report and plots.")
    m = p.add_argument_group("measurement")
    m.add_argument("--steps", type=_count(1), default=o.steps, help="timed steps (batches) per stage")
    m.add_argument("--warmup", type=_count(0), default=o.warmup, help="untimed steps first, per stage")
    m.add_argument("--window", type=_count(1), default=o.window, help="steps per timing window")
    m.add_argument("--out", metavar="DIR", default=None,
                   help="folder for profile.json and the plots; None: runs/profile-<time>")
    m.add_argument("--json", metavar="FILE", help="also write the JSON report here")
    _add_shared(p, d)


def _add_export(sub):
    from supmae.export import POOLS
    p = sub.add_parser("export", help="write a checkpoint's encoder as a timm ViT checkpoint (safetensors)",
                       description="Write the encoder of a pretraining checkpoint as a timm VisionTransformer "
                                   "state dict in safetensors, for timm.create_model(..., pretrained=True, "
                                   "pretrained_cfg_overlay=dict(file=OUT)).")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("out", metavar="OUT", help="the .safetensors file to write")
    p.add_argument("--global-pool", choices=POOLS, default="avg",
                   help="the timm global_pool the weights are for (avg: the final norm becomes fc_norm)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a frozen encoder")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser, required=True)
    knn = kinds.add_parser("knn", help="weighted k-NN top-1 on the encoder's features",
                           description="Weighted k-NN classification (top-1) of the validation images by the "
                                       "frozen encoder's features of the training images.")
    _add_splits(knn)
    knn.add_argument("--k", type=_count(1), default=20)
    knn.add_argument("--temperature", type=_number(0), default=0.07)
    knn.add_argument("--pool", choices=("avg", "token"), default="avg", help="how the encoder's tokens are pooled")
    knn.add_argument("--batch-size", type=_count(1), default=64)
    linear = kinds.add_parser("linear", help="linear probe top-1 on the frozen encoder's features",
                              description="Train BatchNorm (no affine) + Linear on the frozen encoder's features of "
                                          "the training images; report top-1 on the validation images.")
    _add_splits(linear)
    linear.add_argument("--epochs", type=_count(1), default=90)
    linear.add_argument("--batch-size", type=_count(1), default=256)
    linear.add_argument("--blr", type=_number(0), default=0.1, help="base lr: lr = blr * batch / 256")
    for kind in (knn, linear):
        kind.add_argument("--json", metavar="FILE", help="also write the result here")


def _add_splits(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a pretraining checkpoint")
    p.add_argument("--train", required=True, help="image folder, file list or .beton with the labelled train split")
    p.add_argument("--val", required=True, help="the validation split, with the same classes")
    p.add_argument("--workers", type=_count(0), default=2, help="decoding processes")
    p.add_argument("--device", default="auto")


def _add_finetune(sub):
    from supmae.finetune import FinetuneConfig
    from supmae.pipelines.loader import ENGINES
    d = FinetuneConfig("", "", "")
    p = sub.add_parser("finetune", help="fine-tune the encoder on labels (official recipe); report top-1",
                       description="Fine-tune a pretrained encoder as a timm ViT with global average pooling, "
                                   "with the official recipe as defaults; report top-1 on the validation split.")
    _add_splits(p)
    p.add_argument("--epochs", type=_number(0), default=d.epochs)
    p.add_argument("--batch-size", type=_count(1), default=d.batch_size)
    p.add_argument("--blr", type=_number(0), default=d.blr, help="base lr: lr = blr * batch / 256")
    p.add_argument("--layer-decay", type=_number(0, 1, open_high=False), default=d.layer_decay)
    p.add_argument("--weight-decay", type=_number(0, open_low=False), default=d.weight_decay)
    p.add_argument("--drop-path", type=_number(0, 1, open_low=False), default=d.drop_path)
    p.add_argument("--smoothing", type=_number(0, 1, open_low=False), default=d.smoothing)
    p.add_argument("--mixup", type=_number(0, open_low=False), default=d.mixup, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=_number(0, open_low=False), default=d.cutmix, help="cutmix alpha (0: off)")
    p.add_argument("--warmup-epochs", type=_number(0, open_low=False), default=d.warmup_epochs)
    p.add_argument("--loader", choices=("auto", *ENGINES), default=d.loader,
                   help="decoding engine; auto: ffcv for a .beton, torch otherwise")
    p.add_argument("--seed", type=_count(0), default=d.seed)
    p.add_argument("--output", help="folder for the fine-tuned model.safetensors")


def _add_visualize(sub):
    p = sub.add_parser("visualize", help="PNG grid: original | visible | reconstruction",
                       description="Write a PNG grid of a few images: the original, the visible patches, the "
                                   "reconstruction, and the reconstruction with the visible patches pasted back.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="image folder, file list or .beton; its first images are shown")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--images", type=_count(1), default=6)
    p.add_argument("--seed", type=_count(0), default=0, help="mask seed")
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="supmae", description="Fast pretraining of ViTs with Supervised Masked Autoencoders.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    _add_synth(sub)
    _add_convert(sub)
    _add_pretrain(sub)
    _add_profile(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_finetune(sub)
    _add_visualize(sub)
    sub.add_parser("models", help="list the model names")
    parser.commands = sub.choices
    return parser


def _run(args) -> None:
    if args.command == "synth":
        from supmae.pipelines.synthetic import write_synthetic
        write_synthetic(args.out_dir, args.classes, args.images_per_class, args.seed, args.workers, args.force)
        print(f"wrote {args.classes} x {args.images_per_class} images to {args.out_dir}")
    elif args.command == "convert":
        from supmae.pipelines.convert import ConvertOptions, convert
        options = ConvertOptions(args.write_mode, args.max_resolution, args.jpeg_quality, args.compress_probability,
                                 args.smart_threshold)
        convert(args.src, args.out, options, args.workers, args.force, args.progress)
    elif args.command == "pretrain":
        from supmae.train import PretrainConfig, pretrain
        options = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        pretrain(PretrainConfig(**options))
    elif args.command == "profile":
        import dataclasses
        import time
        from supmae.profiler import ProfileOptions, profile
        from supmae.train import PretrainConfig
        measurement = {"steps", "warmup", "window", "out", "json"}
        options = ProfileOptions(**{k: getattr(args, k) for k in measurement})
        options.out = options.out or time.strftime("runs/profile-%Y%m%d-%H%M%S")
        run_fields = {f.name for f in dataclasses.fields(PretrainConfig)} - measurement
        profile(PretrainConfig(**{k: v for k, v in vars(args).items() if k in run_fields}, progress=False), options)
    elif args.command == "export":
        from supmae.export import export
        info = export(args.checkpoint, args.out, args.global_pool, args.force)
        print(f"wrote {args.out}: {info['tensors']} tensors, {info['parameters'] / 1e6:.1f}M parameters of "
              f"{info['supmae_model']} (step {info['step']}), for timm global_pool={args.global_pool!r}")
    elif args.command == "eval":
        from supmae.measure import write_json
        if args.kind == "knn":
            from supmae.evaluate import eval_knn
            result = eval_knn(args.checkpoint, args.train, args.val, args.k, args.temperature, args.batch_size,
                              args.workers, args.device, args.pool)
        else:
            from supmae.finetune import linear_probe
            result = linear_probe(args.checkpoint, args.train, args.val, args.epochs, args.batch_size, args.blr,
                                  args.workers, args.device)
        if args.json:
            write_json(args.json, result)
    elif args.command == "finetune":
        from supmae.finetune import FinetuneConfig, finetune
        finetune(FinetuneConfig(**{k: v for k, v in vars(args).items() if k != "command"}))
    elif args.command == "visualize":
        from supmae.visualize import visualize
        visualize(args.checkpoint, args.data, args.out, args.images, args.seed, args.device)
    elif args.command == "models":
        from supmae.registry import list_models
        print("\n".join(list_models()))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Typed words override a config file's, which override a resumed checkpoint's.
        words = argv[1:]
        if getattr(args, "config", None):
            from supmae.config_file import config_words
            words = [*config_words(parser.commands[args.command], args.config, words), *words]
            args = parser.parse_args([argv[0], *words])
        if args.command == "pretrain" and args.resume:
            from supmae.config_file import resumed_words
            words = [*resumed_words(parser.commands[args.command], args.resume, args.output, words), *words]
            args = parser.parse_args([argv[0], *words])
        _run(args)
    except SupmaeError as error:
        print(f"supmae: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a path that cannot be written or read: the system's own words suffice
        print(f"supmae: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("supmae: interrupted", file=sys.stderr)
        return 130
    return 0
