"""The examples in docstrings and in the README run (BoTorch's habit: examples that execute)."""

import doctest
import re
from pathlib import Path

import pytest

import hbmeta
import hbmeta.evaluation.calibration
import hbmeta.experiments.config
import hbmeta.experiments.registry
import hbmeta.models.functional
import hbmeta.tasks.fewshot

README = Path(__file__).resolve().parents[1] / "README.md"
MODULES = [hbmeta, hbmeta.evaluation.calibration, hbmeta.tasks.fewshot, hbmeta.models.functional,
           hbmeta.experiments.config, hbmeta.experiments.registry]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_readme_run_config_example_runs(tmp_path, monkeypatch):
    """The README's ``TrainConfig`` block trains, resolves its defaults and reloads, as it says."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "TrainConfig(" in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("iterations=200", "iterations=20"), "README.md", "exec"), scope)
    assert scope["saved"] == scope["result"].config and scope["iteration"] == 20
    assert scope["result"].config.meta_batch == 25 and scope["result"].config.inner.steps == 3


#: the README's training loops, cut to a test's budget (the only change made to the code before it runs)
_BUDGET = {"range(2000)": "range(20)", "range(100)": "range(3)", "sample(50, gen)": "sample(4, gen)",
           "iterations=200": "iterations=20"}


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_readme_blocks("python"))))
def test_every_readme_python_block_runs(index, tmp_path, monkeypatch):
    """Each block runs on its own in a fresh namespace (nothing from an earlier block), as a reader pastes it."""
    code = _readme_blocks("python")[index]
    if "omniglot" in code:
        from hbmeta.tasks.data import default_data_root

        if not (default_data_root() / "omniglot" / "images_background.npz").exists():
            pytest.skip("Omniglot npz files not found (set HBMETA_DATA)")
    for long, short in _BUDGET.items():
        code = code.replace(long, short)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_every_readme_command_line_parses():
    """Every ``hbmeta ...`` line of the README's shell blocks is a valid command (parsed, not run: some take hours);
    every module run with ``-m`` and every script exists."""
    import importlib.util
    import shlex

    from hbmeta.cli import build_parser

    parser, seen = build_parser(), 0
    for block in _readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if "-m" in words:
                module = words[words.index("-m") + 1]
                assert importlib.util.find_spec(module) is not None, line
                words = ["hbmeta", *words[words.index("-m") + 2:]] if module == "hbmeta.cli" else []
            elif words[0] == "bash":
                assert (README.parent / words[1]).exists(), line
                continue
            if words and words[0].endswith("hbmeta") and not {"--help", "--version"} & set(words):
                parser.parse_args(words[1:])
                seen += 1
    assert seen >= 20


#: small-budget flags appended to each README command line (argparse keeps the last of a repeated flag)
_SMALL_FLAGS = {
    "train": ["--iterations", "2", "--meta-batch", "2", "--eval-tasks", "2", "--no-progress", "--checkpoint-every", "1"],
    "demo": ["--iterations", "2", "--meta-batch", "2", "--no-progress"],
    "evaluate": ["--tasks", "2"], "diagnose": ["--tasks", "2"], "calibrate": ["--tasks", "2"],
    "compare": ["--tasks", "2", "--samples", "16"], "gradient-study": ["--repeats", "1"],
    "step": ["--repeats", "1"], "scaling": ["--repeats", "1", "--warmup", "0", "--inner-steps", "1"],
    "throughput": ["--repeats", "1", "--meta-batches", "4", "--benchmarks", "sinusoid"],
    "accuracy": ["--budget", "smoke", "--seeds", "0", "--algos", "gem-bml+", "--benchmarks", "sinusoid"],
}


def test_every_readme_command_runs_in_order_on_a_small_budget(tmp_path, monkeypatch, capsys):
    """The README's shell blocks, top to bottom, in one folder (later commands read earlier runs), each ``hbmeta``
    line run with a small budget appended. Not run: the install line, pytest / CI lines, torchrun and the GPU script
    (tests/training/test_distributed.py and scripts/gpu_check.sh cover those), ``bench scaling`` (conv4 on
    miniImageNet-shaped tasks: 90 s even at one repetition; tests/bench/test_step_bench.py runs it on a small
    config) and Omniglot without its data."""
    import shlex

    from hbmeta.cli import main
    from hbmeta.tasks.data import default_data_root

    root = default_data_root()
    monkeypatch.setenv("HBMETA_DATA", str(root))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)
    have_omniglot = (root / "omniglot" / "images_background.npz").exists()
    ran = 0
    for block in _readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words or words[0] != "hbmeta" or {"--help", "--version"} & set(words):
                continue
            if ("omniglot" in words and not have_omniglot) or words[1:3] == ["bench", "scaling"]:
                continue
            command = words[1]
            flags = _SMALL_FLAGS.get(words[2] if command == "bench" else command, [])
            if command == "train":
                rl = any(w in words for w in ("nav2d", "cheetah-vel", "cheetah-dir"))
                flags = flags + (["--shots", "2", "--horizon", "5"] if rl else [])
                if "--resume" in words:  # continue past the 2 iterations of the run it resumes
                    flags = [f if f != "2" or flags[i - 1] != "--iterations" else "4" for i, f in enumerate(flags)]
            code = main(words[1:] + flags)
            assert code == 0, (line, capsys.readouterr().err[-2000:])
            ran += 1
    assert ran >= 25 if have_omniglot else ran >= 20
