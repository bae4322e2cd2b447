"""The house: layers import one way, modules import in no circle, and a model option is one field in one file."""
import ast
import json
import pathlib
import shutil
import subprocess
import sys

import grimp

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_no_module_imports_itself_round_a_circle():
    graph = grimp.build_graph("supmae", include_external_packages=False)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    # Tarjan's strongly connected components: a component of more than one module is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in edges[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert len(edges) > 60 and any(m.startswith("supmae.pipelines.") for m in edges)  # the linked folders count
    assert circles == []


def test_every_subpackage_says_its_job():
    for init in sorted((REPO / "supmae").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) < 400, init


def _python(tree: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tree, capture_output=True, text=True, timeout=300)


def test_a_model_option_is_one_field_in_one_file(tmp_path, synth_folder):
    """A field added to SupMAE's options, and nowhere else, is an option of --help, a config file's key, a
    setting a resumed run keeps, and the model's."""
    tree = tmp_path / "tree"
    for name in ("supmae", "pipelines", "kernels"):
        shutil.copytree(REPO / name, tree / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    families = tree / "supmae" / "models" / "families.py"
    anchor = '    temperature: float = option(10.0, "temperature of the classification logits", above=0, group=GROUP)\n'
    assert anchor in families.read_text()
    families.write_text(families.read_text().replace(anchor, anchor + (
        '    probe_weight: float = option(0.25, "a throw-away option", at_least=0, group=GROUP)\n')))

    shown = _python(tree, "-m", "supmae", "pretrain", "--help")
    assert shown.returncode == 0 and "--probe-weight PROBE_WEIGHT" in shown.stdout
    assert "a throw-away option (default: 0.25)" in " ".join(shown.stdout.split())
    refused = _python(tree, "-m", "supmae", "pretrain", "--probe-weight", "-1")
    assert (refused.returncode, refused.stderr) == (1, "supmae: error: --probe-weight: must be at least 0, got -1\n")

    (tree / "run.toml").write_text("probe-weight = 0.5\n")
    run = ["-m", "supmae", "pretrain", "--data", synth_folder, "--output", "out", "--model", "supmae_vit_tiny_patch16",
           "--img-size", "32", "--batch-size", "4", "--workers", "0", "--loader", "torch", "--device", "cpu",
           "--no-progress", "--no-tensorboard"]
    first = _python(tree, *run, "--steps", "1", "--config", "run.toml")
    assert first.returncode == 0, first.stderr
    resumed = _python(tree, *run, "--steps", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tree / "out" / "config.json").read_text())["probe_weight"] == 0.5
    probe = ("from supmae.evaluation.pretrained import load_pretrained\n"
             "model, _ = load_pretrained('out/checkpoint-00000002.pt', 'cpu')\nprint(model.options.probe_weight)\n")
    seen = _python(tree, "-c", probe)
    assert (seen.returncode, seen.stdout.split()[-1:]) == (0, ["0.5"]), seen.stderr
