"""`supmae` command line: a table of commands, each a configuration (declared, without torch, by the layer
that runs it) and the function that runs it. The parser is built from the configurations; a command's
configuration is merged from its layers (defaults < resumed checkpoint < config file < typed options) and
checked before the command's module, and with it torch, is imported. Every user error is one line on stderr
and a non-zero exit."""
import argparse
import dataclasses
import importlib
import inspect
import logging
import os
import sys

from supmae.core.errors import SupmaeError
from supmae.core.options import Config, add_arguments, configuration
from supmae.evaluation.config import (
    ExportConfig,
    FewshotConfig,
    FinetuneConfig,
    KnnConfig,
    LinearConfig,
    RetrievalConfig,
    RobustnessConfig,
    VisualizeConfig,
    ZeroshotConfig,
)
from supmae.models.families import list_models
from supmae.pipelines.config import ConvertConfig, SynthConfig
from supmae.profiling.config import ProfileConfig
from supmae.training.config import PretrainConfig


@dataclasses.dataclass(frozen=True)
class Command:
    config: type                    # its options; the class docstring is its description in --help
    run: str                        # "module:function" taking the configuration, imported once it is checked
    help: str                       # its line in `supmae --help`
    resumed: str | None = None   # "module:function" giving the options a resumed run takes from its checkpoint


@configuration
class ModelsConfig(Config):
    """List the model names of the registry."""


def print_models(cfg: ModelsConfig) -> None:
    """`supmae models`."""
    print("\n".join(list_models()))


COMMANDS = {
    "synth": Command(SynthConfig, "supmae.pipelines.synthetic:synth",
                     "write the embedded synthetic dataset as an image folder of JPEGs"),
    "convert": Command(ConvertConfig, "supmae.pipelines.convert:convert",
                       "convert an image folder or file list to an FFCV .beton"),
    "pretrain": Command(PretrainConfig, "supmae.training.loop:pretrain", "pretrain a SupMAE/MAE model",
                        resumed="supmae.training.checkpoint:resumed_options"),
    "profile": Command(ProfileConfig, "supmae.profiling.profiler:profile",
                       "measure loader, step and end to end; name what bounds the run"),
    "export": Command(ExportConfig, "supmae.evaluation.export:export",
                      "write a checkpoint's encoder as a timm ViT checkpoint (safetensors)"),
    "eval knn": Command(KnnConfig, "supmae.evaluation.knn:eval_knn", "weighted k-NN top-1 on the encoder's features"),
    "eval linear": Command(LinearConfig, "supmae.evaluation.linear:linear_probe",
                           "linear probe top-1 on the frozen encoder's features"),
    "eval zeroshot": Command(ZeroshotConfig, "supmae.evaluation.zeroshot:eval_zeroshot",
                             "zero-shot top-1 and top-5 of a CLIP-family model"),
    "eval retrieval": Command(RetrievalConfig, "supmae.evaluation.retrieval:eval_retrieval",
                              "image-text retrieval recall of a CLIP-family model"),
    "eval robustness": Command(RobustnessConfig, "supmae.evaluation.robustness:eval_robustness",
                               "top-1 under ImageNet-C, -A, -R, -Sketch or on-the-fly corruptions; mCE"),
    "eval fewshot": Command(FewshotConfig, "supmae.evaluation.fewshot:eval_fewshot",
                            "k-shot top-1 (mean and std over seeds) on the frozen encoder's features"),
    "finetune": Command(FinetuneConfig, "supmae.evaluation.finetune:finetune",
                        "fine-tune the encoder on labels (official recipe); report top-1"),
    "visualize": Command(VisualizeConfig, "supmae.evaluation.visualize:visualize",
                         "PNG grid: original | visible | reconstruction"),
    "models": Command(ModelsConfig, "supmae.cli.main:print_models", "list the model names"),
}
GROUPS = {"eval": "evaluate a frozen encoder"}  # commands of two words, by their first


class _Parser(argparse.ArgumentParser):
    """One-line errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _function(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="supmae", description="Fast pretraining of ViTs with Supervised Masked Autoencoders.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    groups = {}
    for name, command in COMMANDS.items():
        if " " in name:
            group, name = name.split(" ")
            if group not in groups:
                groups[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest="subcommand", metavar="KIND", parser_class=_Parser, required=True)
            target = groups[group]
        else:
            target = sub
        p = target.add_parser(name, help=command.help, description=inspect.cleandoc(command.config.__doc__ or ""),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        if any(not opt.positional for _, opt in command.config.options()):
            p.add_argument("--config", metavar="FILE", help="a TOML or YAML table of these options (option = value); "
                                                            "the command line overrides it")
        add_arguments(p, command.config)
    return parser


def configure(command: Command, typed: dict) -> Config:
    """The command's configuration from what was typed: a config file's options under the typed ones, and a
    resumed run's checkpoint's under both, each layer checked as the whole is built."""
    layers = []
    path = typed.pop("config", None)
    if path:
        from supmae.cli.config_file import read_table
        layers.append(command.config.fields_of(read_table(path), f"config file {path}"))
    layers.append(typed)
    cfg = command.config.merge(*layers)
    if command.resumed:
        resumed = _function(command.resumed)(cfg)
        if resumed:
            cfg = command.config.merge(resumed, *layers)
    return cfg


class _Console(logging.Handler):
    """supmae's log lines as a command line prints them: information on stdout, warnings and worse on stderr.
    The streams are looked up per line, so a redirected sys.stdout is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        warning = record.levelno >= logging.WARNING
        stream = sys.stderr if warning else sys.stdout
        stream.write(("warning: " if record.levelno == logging.WARNING else "") + record.getMessage() + "\n")
        stream.flush()


def _configure_logging() -> None:
    logger = logging.getLogger("supmae")
    for handler in [h for h in logger.handlers if isinstance(h, _Console)]:
        logger.removeHandler(handler)
    logger.addHandler(_Console())
    # Under torchrun every rank runs this; rank 0 speaks for all of them.
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.ERROR)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    typed = vars(build_parser().parse_args(argv))
    name = " ".join(filter(None, (typed.pop("command"), typed.pop("subcommand", None))))
    command = COMMANDS[name]
    _configure_logging()
    try:
        cfg = configure(command, typed)  # first: a bad option is found before the command's imports
        _function(command.run)(cfg)
    except (SupmaeError, OSError) as error:  # an OSError's own words name the path and what went wrong
        line = str(error).replace("\r", "\\r").replace("\n", "\\n")  # a file name may hold either
        print(f"supmae: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("supmae: interrupted", file=sys.stderr)
        return 130
    return 0
