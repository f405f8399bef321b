"""Every `train.py` command the documentation shows passes argument checking at the world size it names.

Commands are read from README.md, docs/*.md and train.py's docstring (code blocks, with their `\\` continuations,
and inline code), so a command added to the docs is covered without editing this test. `torchrun
--nnodes=M --nproc_per_node=N` names a world of M x N ranks; `python train.py` one.
"""

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARD = "torchrun --nproc_per_node=8 train.py --algo genac"  # the design card's command, literally


def documented_texts() -> dict[str, str]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in files}
    source = (ROOT / "train.py").read_text()
    texts["train.py"] = source[source.index('"""') + 3:source.index('"""', source.index('"""') + 3)]
    return texts


def command_spans(text: str) -> list[str]:
    """Code-block lines, fenced or indented by 4 spaces (a trailing `\\` joins the next line; `# comments` dropped),
    and inline code spans."""
    spans, in_block, pending = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if in_block or pending or line.startswith("    ") and line.strip().startswith(("torchrun", "python")):
            line = pending + " " + line.split(" # ")[0].split("  #")[0].strip()
            pending = line[:-1] if line.endswith("\\") else ""
            if not pending:
                spans.append(line)
        else:
            spans += re.findall(r"`([^`]+)`", line)
    return spans


def train_commands(text: str) -> list[tuple[str, int, list[str]]]:
    """-> (command, world, train.py's argv) for every `torchrun ... train.py ...` / `python train.py ...`."""
    found = []
    for span in command_spans(text):
        for part in re.split(r"&&|;|\|", span):
            try:
                tokens = shlex.split(part)
            except ValueError:
                continue
            if "train.py" not in tokens or tokens[0] not in ("torchrun", "python", "python3"):
                continue
            if tokens[0] != "torchrun" and tokens[1] != "train.py":
                continue
            cut = tokens.index("train.py")
            launcher, argv = tokens[:cut], [t for t in tokens[cut + 1:] if t != "..."]
            world = 1
            if tokens[0] == "torchrun":
                options = dict(re.findall(r"--(nproc[_-]per[_-]node|nnodes)[= ](\d+)", " ".join(launcher)))
                world = int(options.get("nproc_per_node", options.get("nproc-per-node", 1))) * int(
                    options.get("nnodes", 1))
            found.append((part.strip(), world, argv))
    return found


def docstring_commands() -> list[tuple[str, int, list[str]]]:
    doc = documented_texts()["train.py"]
    return train_commands("```\n" + doc + "\n```")


ALL = [(name, *c) for name, text in documented_texts().items() if name != "train.py" for c in train_commands(text)]
ALL += [("train.py", *c) for c in docstring_commands()]


def test_the_extraction_finds_the_commands_that_matter():
    """The card's command, the README's 8-GPU command, a 2-node command (16 ranks) and the default command."""
    worlds = {(name, world) for name, _, world, _ in ALL}
    commands = " | ".join(command for _, command, _, _ in ALL)
    assert ("README.md", 8) in worlds and ("docs/memory.md", 16) in worlds and ("README.md", 1) in worlds
    assert CARD in commands and len(ALL) >= 20


def parse_at(monkeypatch, argv: list[str], world: int):
    import train
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    return train.parse_args(argv)


@pytest.mark.parametrize("name,command,world,argv", ALL, ids=[f"{a}:{c[:60]}" for a, c, _, _ in ALL])
def test_every_documented_command_passes_argument_checking_at_its_world_size(monkeypatch, name, command, world, argv):
    if "myalgo" in argv:  # README's "Add an algorithm": the file a reader writes first
        pytest.skip("an algorithm the reader adds")
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_:
            parse_at(monkeypatch, argv, world)
        assert exit_.value.code == 0, (name, command)
        return
    args = parse_at(monkeypatch, argv, world)
    assert args.prompts_per_step % world == 0, (name, command)


@pytest.mark.parametrize("world", [8, 16])
def test_the_design_card_command_starts_at_8_and_16_ranks(monkeypatch, capsys, world):
    """The unset --prompts-per-step follows the world size (rounded up, printed); a value given is kept or refused."""
    args = parse_at(monkeypatch, shlex.split(CARD)[3:], world)
    assert args.prompts_per_step == world and args.algo == "genac"
    assert f"--prompts-per-step {world}: the default 4 rounded up to the {world} ranks" in capsys.readouterr().err
    assert parse_at(monkeypatch, ["--algo", "poise"], world).prompts_per_step == 16  # POISE's own default divides
    assert parse_at(monkeypatch, ["--algo", "grpo", "--prompts-per-step", str(3 * world)], world).prompts_per_step \
        == 3 * world
    with pytest.raises(SystemExit):
        parse_at(monkeypatch, ["--prompts-per-step", "4"], world)  # given, not a multiple: refused, not changed


def test_one_rank_keeps_the_defaults(monkeypatch):
    assert parse_at(monkeypatch, [], 1).prompts_per_step == 4
    assert parse_at(monkeypatch, ["--algo", "poise"], 3).prompts_per_step == 18  # 16 rounded up to 3 ranks


def test_the_early_check_rounds_too(monkeypatch):
    """train.py's check before the heavy imports (flags.check_run_arguments_early) lets the card's command pass and
    still refuses a given --prompts-per-step that does not divide, in one line."""
    import subprocess
    env = {"WORLD_SIZE": "8", "PATH": "/usr/bin:/bin"}
    code = ("import sys; sys.path.insert(0, %r); import flags; flags.check_run_arguments_early(sys.argv[1:], "
            "'train.py'); print('ok')" % str(ROOT))
    ok = subprocess.run([sys.executable, "-c", code, "--algo", "genac"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    bad = subprocess.run([sys.executable, "-c", code, "--prompts-per-step", "12"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "use 16, or leave it unset" in bad.stderr
