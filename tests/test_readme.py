"""The README's commands, as a user would paste them: every one parses, every `make` target
exists, the figures the README states next to a command are what that command builds, and the
offline commands run for real in a short version (the README's own flags, then a few that
shorten the run: click keeps the last value of a repeated option)."""

import re
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from promptserve.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# the docs hold the measurements, each beside the command that reproduces it: checked as well
DOCS = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def block_commands(block: str, prefix: str) -> list[list[str]]:
    """The commands of one bash block that start with ``prefix``, continuations joined and
    comments dropped, as argv without the prefix."""
    argvs = (shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines())
    return [argv[1:] for argv in argvs if argv[:1] == [prefix]]


def commands(prefix: str, text: str = README + DOCS) -> list[list[str]]:
    """Every command in the README's and the docs' bash blocks that starts with ``prefix``."""
    return [argv for block in bash_blocks(text) for argv in block_commands(block, prefix)]


PROMPTSERVE = commands("promptserve")
MAKE = commands("make")


def test_the_readme_has_commands_to_check():
    assert len(PROMPTSERVE) >= 10 and len(MAKE) >= 5


@pytest.mark.parametrize("argv", PROMPTSERVE, ids=lambda a: " ".join(a[:2]))
def test_every_promptserve_command_in_the_readme_parses(argv):
    """Unknown flags, bad values and missing commands fail here, before a user meets them."""
    command: click.Command = typer.main.get_command(app)
    ctx = click.Context(command, info_name="promptserve")
    rest = list(argv)
    while isinstance(command, click.Group):
        assert rest, f"promptserve {' '.join(argv)}: a command group with no command"
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"no command {rest[0]!r} in: promptserve {' '.join(argv)}"
        command, rest = sub, rest[1:]
    command.make_context(argv[0], rest, parent=ctx, resilient_parsing=False)


@pytest.mark.parametrize("argv", MAKE, ids=lambda a: a[0])
def test_every_make_target_in_the_readme_exists(argv):
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{re.escape(argv[0])}:", makefile, flags=re.M), argv


def test_the_request_count_beside_the_gpu_profile_command_is_what_it_builds():
    """The README once showed a table beside a command missing its --time-scale 10, which
    built ten times the requests. The count the text states must be the command's own."""
    from promptserve.workload import generate_arrivals, parse_arrival_spec

    stated = re.search(r"\(([\d,]+) requests\)", DOCS)
    assert stated is not None
    argv = next(a for a in PROMPTSERVE if "--profile" in a and "sd15-shaped-h100" in " ".join(a))
    opts = dict(zip(argv[1::2], argv[2::2])) if argv[0] == "simulate" else {}
    times = generate_arrivals(
        parse_arrival_spec(opts["--arrivals"]),
        time_scale=float(opts.get("--time-scale", 1.0)),
        seed=int(opts.get("--seed", 0)),
    )
    assert len(times) == int(stated.group(1).replace(",", ""))


SHORT = {  # (command, sub) -> flags appended to shorten a run
    ("workload", "inspect"): ["--minutes", "3", "--embedder", "hashing"],
    ("simulate", None): ["--minutes", "2", "--gpus", "2", "--embedder", "hashing"],
    ("sweep", None): ["--minutes", "2", "--seeds", "1", "--embedder", "hashing"],
    ("thresholds", "show"): [],
    ("profile", None): ["--batch-sizes", "1,2"],
}


def short(argv: list[str]) -> list[str] | None:
    key = (argv[0], argv[1] if argv[0] in ("workload", "thresholds") else None)
    if "--device" in argv and argv[argv.index("--device") + 1] != "cpu":
        return None  # a GPU recipe: it parses (above); this machine cannot run it
    if key not in SHORT:
        # serve and bench need a live server, and calibrate runs the model for a minute:
        # test_server, test_cli and test_engine run them
        return None
    extra = ["--rates", "40"] if "--rates" in argv else []
    cache = [] if argv[0] in ("thresholds", "profile") else ["--cache-dir", "cache"]
    return argv + SHORT[key] + extra + cache


def runnable_blocks() -> list[list[list[str]]]:
    """Each bash block's offline commands, in order: a later one may read what an earlier wrote."""
    blocks = (block_commands(block, "promptserve") for block in bash_blocks(README))
    runnable = ([short(a) for a in argvs if short(a) is not None] for argvs in blocks)
    return [argvs for argvs in runnable if argvs]


@pytest.mark.parametrize(
    "block", runnable_blocks(), ids=lambda b: " / ".join(" ".join(a[:2]) for a in b)
)
def test_the_readme_s_offline_commands_run_in_a_short_version(block, tmp_path, monkeypatch):
    """Run in a fresh folder with the project's data/ beside, as in a clone."""
    (tmp_path / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(tmp_path)
    for argv in block:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
        if "--out" in argv:
            assert Path(argv[argv.index("--out") + 1]).exists(), argv
        if argv[0] == "simulate":
            assert "oracle bound" in result.output
