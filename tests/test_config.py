"""Each option is declared once, in its command's configuration: the parser, config files, resumed checkpoints
and the Python API are built from it and checked by it alike."""
import argparse
import dataclasses
import re
import subprocess
import sys

import pytest
from test_cli import REPO, error_of

from supmae.cli.main import COMMANDS, build_parser, main
from supmae.core.errors import SupmaeError
from supmae.core.options import Config, add_arguments, configuration, option, section
from supmae.profiling.config import ProfileConfig
from supmae.training.checkpoint import save_checkpoint
from supmae.training.config import PretrainConfig


def help_of(capsys, *command) -> str:
    """--help's text, unwrapped."""
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit):
        patch.setenv("COLUMNS", "100000")
        main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_every_pretrain_option_is_in_help_with_its_default(capsys):
    text = help_of(capsys, "pretrain")
    for _, opt in PretrainConfig.options():
        assert opt.display in text, opt.name
        assert " ".join(opt.help_text().replace("%%", "%").split()) in text, opt.name
        if opt.default is not None or opt.shown:
            assert "default: " in opt.help_text()


def test_an_option_is_one_field():
    """A configuration declared with one more field has it on the command line, in files and in merges."""
    @configuration
    class Extended(PretrainConfig):
        """Pretrain, with a text tower."""
        text_width: int = option(256, "the text tower's width", at_least=8, group="model and objective")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Extended)
    assert "--text-width TEXT_WIDTH the text tower's width (default: 256)" in " ".join(parser.format_help().split())
    typed = vars(parser.parse_args(["--text-width", "512", "--steps", "3"]))
    assert Extended.merge(Extended.fields_of({"text-width": 128, "epochs": 2}, "file"), typed).text_width == 512
    with pytest.raises(SupmaeError, match="^--text-width: must be at least 8, got 4$"):
        Extended.merge({"text_width": "4"})


BAD = [
    ("batch_size", 0, "--batch-size: must be at least 1, got 0"),
    ("mask_ratio", 1.5, "--mask-ratio: must be at least 0 and below 1, got 1.5"),
    ("pool", "median", "--pool: 'median' is not one of avg, token, max, map"),
    ("lr", 0.0, "--lr: must be above 0, got 0"),
    ("seed", -1, "--seed: must be at least 0 and at most 4294967295, got -1"),
    ("precision", "fp8", "--precision: 'fp8' is not one of auto, bf16, fp16, fp32"),
]


@pytest.mark.parametrize("name, value, message", BAD)
def test_every_entry_point_rejects_a_bad_value_with_the_same_line(capsys, tmp_path, synth_folder, name, value,
                                                                  message):
    flag = "--" + name.replace("_", "-")
    out = str(tmp_path / "run")
    assert error_of(capsys, "pretrain", "--data", synth_folder, "--output", out, flag, str(value)) == \
        f"supmae: error: {message}"
    toml = tmp_path / "run.toml"
    toml.write_text(f"{name.replace('_', '-')} = {value!r}\n".replace("'", '"'))
    assert error_of(capsys, "pretrain", "--data", synth_folder, "--output", out, "--config", str(toml)) == \
        f"supmae: error: {message}"
    (tmp_path / "run").mkdir()
    saved = dict(PretrainConfig.of(data=synth_folder).values(), **{name: value})
    save_checkpoint(dict(model={}, config=saved, step=1), str(tmp_path / "run" / "checkpoint-00000001.pt"))
    assert error_of(capsys, "pretrain", "--output", out, "--resume", "auto") == f"supmae: error: {message}"
    with pytest.raises(SupmaeError) as raised:
        PretrainConfig.of(**{name: value})
    assert str(raised.value) == message


def test_layers_merge_as_data_and_exclusive_options_yield():
    file = PretrainConfig.fields_of({"epochs": 5, "batch-size": 8, "img_size": 32}, "config file x.toml")
    cfg = PretrainConfig.merge({"steps": 2, "lr": 1e-3}, file, {"steps": "3"})  # checkpoint < file < typed
    assert (cfg.epochs, cfg.steps, cfg.batch_size, cfg.trunk.img_size, cfg.lr) == (None, 3, 8, 32, 1e-3)
    assert PretrainConfig.merge({"steps": 2}, {"epochs": 7.5}).steps is None  # a later layer's choice wins
    with pytest.raises(SupmaeError, match="^give --epochs or --steps, not both$"):
        PretrainConfig.merge({"epochs": 1, "steps": 2})
    with pytest.raises(SupmaeError, match="^config file x.toml: unknown option 'bogus'$"):
        PretrainConfig.fields_of({"bogus": 1}, "config file x.toml")
    assert PretrainConfig.fields_of({"bogus": 1, "seed": 2}, "checkpoint", strict=False) == {"seed": 2}


def test_a_section_lends_its_options_flat():
    profile = ProfileConfig.merge({"batch_size": "8", "steps": "5", "model": "mae_vit_tiny_patch16"})
    assert (profile.run.batch_size, profile.steps, profile.run.steps, profile.run.model) == \
        (8, 5, None, "mae_vit_tiny_patch16")
    lent = {opt.name for holder, opt in ProfileConfig.options() if holder == "run"}
    assert {"data", "loader", "device", "model", "mask_ratio"} <= lent and not {"output", "epochs", "lr"} & lent

    @configuration
    class Bench(Config):
        """A benchmark of the step."""
        run: PretrainConfig = section(PretrainConfig, ("model", "batch_size"), batch_size=256)
        json: str | None = option(None, "where the figures go")

    assert Bench().run.batch_size == 256 and Bench.option("batch_size").default == 256
    assert [opt.name for _, opt in Bench.options()] == ["json", "model", "batch_size"]


def test_types_from_text_and_from_files():
    cfg = PretrainConfig.merge({"batch_size": "16", "lr": "1e-3", "compile": True, "epochs": 3})
    assert (cfg.batch_size, cfg.lr, cfg.hardware.compile, cfg.epochs) == (16, 1e-3, True, 3.0)
    assert isinstance(cfg.epochs, float)
    for values, message in [({"batch_size": 8.5}, "--batch-size: expected an integer, got 8.5"),
                            ({"batch_size": True}, "--batch-size: expected an integer, got True"),
                            ({"compile": "yes"}, "--compile: expected true or false, got 'yes'"),
                            ({"model": 3}, "--model: expected text, got 3"),
                            ({"img_size": None}, "--img-size: needs a value")]:
        with pytest.raises(SupmaeError) as raised:
            PretrainConfig.merge(values)
        assert str(raised.value) == message


def test_configurations_are_frozen_and_keyword_only():
    cfg = PretrainConfig.of(batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 0  # pyright: ignore[reportAttributeAccessIssue]
    with pytest.raises(TypeError):
        PretrainConfig("some/data")  # pyright: ignore[reportCallIssue]
    with pytest.raises(SupmaeError, match="must be at least 1"):
        dataclasses.replace(cfg, batch_size=0)  # a changed copy is checked again


def test_every_command_is_one_table_entry(capsys):
    parser = build_parser()
    for name, command in COMMANDS.items():
        words = name.split()
        text = help_of(capsys, *words)
        first_line = " ".join((command.config.__doc__ or "").split("\n")[0].split())
        assert first_line in text, name
        module, function = command.run.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))
    assert parser.prog == "supmae"


def test_the_cli_checks_options_before_importing_torch():
    """--help and a refused option load no part of the heavy stack: a bad path is found before it."""
    probe = ("import sys\nfrom supmae.cli.main import main\n"
             "code = main(['pretrain', '--data', '/no/such/data'])\n"
             "try:\n    main(['pretrain', '--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = ('torch', 'numpy', 'PIL', 'ffcv', 'nvidia.dali', 'timm')\n"
             "print(code, sorted(m for m in heavy if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "supmae: error: --data: /no/such/data does not exist\n"
    assert done.stdout.splitlines()[-1] == "1 []"


def test_only_the_two_subpackages_resolve_beside_the_package():
    done = subprocess.run([sys.executable, "-c", "import supmae.supmae"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "No module named 'supmae.supmae'" in done.stderr
    done = subprocess.run([sys.executable, "-c", "import supmae.benchmarks"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode != 0
    import supmae.kernels
    import supmae.pipelines
    assert re.search(r"[/\\]pipelines[/\\]__init__\.py$", supmae.pipelines.__file__)
    assert re.search(r"[/\\]kernels[/\\]__init__\.py$", supmae.kernels.__file__)


def test_a_listed_option_checks_each_entry():
    assert ProfileConfig.merge({"stages": "loader, end_to_end"}).stage_list == ["loader", "end_to_end"]
    for value, message in [("loader,nope", "--stages: 'nope' given; choose from loader, step, end_to_end"),
                           (" , ", "--stages: nothing given; choose from loader, step, end_to_end")]:
        with pytest.raises(SupmaeError) as raised:
            ProfileConfig.merge({"stages": value})
        assert str(raised.value) == message
