"""Mutation fuzz: rewrite, inspect and draw on damaged real-looking nets end in success or a typed CaffetuneError,
never another exception (the CLI turns only CaffetuneError into a message; anything else would be a traceback).

The seeds are the small nets written for the tests (tests/data/rewrite: V0, V1, current, deploy and train_val,
squeeze-and-excitation, dense blocks, two streams, mixed layer keys). Each mutant gets one or two random edits: a
dropped line, a swapped layer type, an odd number, a renamed blob, a truncation, junk bytes (some not UTF-8) or a
duplicated line. The random generator is seeded, so a failure names a mutant that can be replayed.
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.errors import CaffetuneError
from caffetune.report import draw, inspection
from caffetune.surgery import rewrite

SEEDS = sorted((Path(__file__).resolve().parent.parent / "data" / "rewrite").glob("*.prototxt"))
TYPES = ["Convolution", "InnerProduct", "Softmax", "Sigmoid", "ReLU", "Pooling", "Concat", "Eltwise", "Reshape",
         "Input", "Data", "SoftmaxWithLoss", "Accuracy", "BatchNorm", "Scale", "Deconvolution", "Flatten",
         "Dropout", "Split", "Slice", "Python", "NoSuchType", "CONVOLUTION", "conv"]
ODD_NUMBERS = ["0", "-1", "-7", "99999999", "2147483648", "1e30", "0.5", "nan", "inf", "-0", "3"]


def _drop_lines(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    for _ in range(rng.randint(1, 3)):
        if lines:
            del lines[rng.randrange(len(lines))]
    return "".join(lines)


def _swap_type(text: str, rng: random.Random) -> str:
    found = list(re.finditer(r'type:\s*("[^"]*"|[A-Z_]+)', text))
    if not found:
        return text
    match = rng.choice(found)
    kind = rng.choice(TYPES)
    written = kind if kind.isupper() or kind.islower() and not match.group(1).startswith('"') else f'"{kind}"'
    return text[:match.start(1)] + written + text[match.end(1):]


def _odd_number(text: str, rng: random.Random) -> str:
    found = list(re.finditer(r"(?<![\w.])-?\d+(\.\d+)?", text))
    if not found:
        return text
    match = rng.choice(found)
    return text[:match.start()] + rng.choice(ODD_NUMBERS) + text[match.end():]


def _rename_blob(text: str, rng: random.Random) -> str:
    found = list(re.finditer(r'((?:bottom|top):\s*)"([^"]*)"', text))
    if not found:
        return text
    match = rng.choice(found)
    names = [m.group(2) for m in found] + ["nowhere", ""]
    return text[:match.start()] + f'{match.group(1)}"{rng.choice(names)}"' + text[match.end():]


def _truncate(text: str, rng: random.Random) -> str:
    return text[:rng.randrange(len(text) + 1)]


def _duplicate_line(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    lines.insert(rng.randrange(len(lines) + 1), rng.choice(lines))
    return "".join(lines)


MUTATIONS = [_drop_lines, _swap_type, _swap_type, _odd_number, _odd_number, _rename_blob, _truncate,
             _duplicate_line]


def mutant(rng: random.Random) -> tuple[bytes, str]:
    """(file bytes, what was done) for one random mutant of a random seed."""
    seed = rng.choice(SEEDS)
    text, done = seed.read_text(), [seed.name]
    for _ in range(rng.randint(1, 2)):
        mutation = rng.choice(MUTATIONS + ["junk"])
        done.append(getattr(mutation, "__name__", mutation))
        if mutation != "junk":
            text = mutation(text, rng)
    data = text.encode()
    if "junk" in done:
        position = rng.randrange(len(data) + 1)
        data = data[:position] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 6))) + data[position:]
    return data, " ".join(done)


def _typed_or_success(action, what: str) -> str:
    try:
        action()
    except CaffetuneError:
        return "typed error"
    except Exception as error:   # noqa: BLE001 - the point: any other exception fails, naming the mutant
        pytest.fail(f"{what}: {type(error).__name__}: {error}")
    return "success"


def actions(net: Path, out: Path) -> list:
    """rewrite (writing its outputs), inspect (caffetune's shape inference) and draw (a .dot file) of one net."""
    options = rewrite.Options(classes=3, name="ft")
    return [lambda: rewrite.rewrite_files(net, options, output=str(out)),
            lambda: inspection.inspect_net(net, use_pycaffe=False),
            lambda: draw.draw_net(net, out.with_suffix(".dot"))]


def test_library_never_raises_an_untyped_exception(tmp_path):
    rng = random.Random(20261130)
    outcomes = {"success": 0, "typed error": 0}
    for number in range(300):
        data, what = mutant(rng)
        net = tmp_path / f"mutant{number}.prototxt"
        net.write_bytes(data)
        for action in actions(net, tmp_path / f"out{number}"):
            outcomes[_typed_or_success(action, f"mutant {number} ({what})")] += 1
    assert outcomes["success"] > 50 and outcomes["typed error"] > 50, outcomes   # both paths were exercised


def commands(net: Path, out: Path) -> list[list[str]]:
    return [["rewrite", str(net), "--classes", "3", "--json"], ["inspect", str(net), "--no-pycaffe"],
            ["draw", str(net), "-o", str(out)]]


def test_cli_commands_end_in_an_exit_or_a_typed_error(tmp_path):
    """In-process: what reaches `caffetune.cli.main` is a click exit or a CaffetuneError (printed as one line)."""
    rng = random.Random(7)
    runner = CliRunner(mix_stderr=False)
    for number in range(12):
        data, what = mutant(rng)
        net = tmp_path / f"mutant{number}.prototxt"
        net.write_bytes(data)
        for args in commands(net, tmp_path / f"m{number}.dot"):
            result = runner.invoke(cli, args)
            assert result.exception is None or isinstance(result.exception, (SystemExit, CaffetuneError)), \
                f"{args[0]} on mutant {number} ({what}): {result.exception!r}"


def test_the_installed_command_prints_one_error_line(tmp_path):
    """Through the real entry point: a named non-zero exit and an `error:` message, no traceback."""
    rng = random.Random(11)
    checked = 0
    while checked < 2:
        data, what = mutant(rng)
        net = tmp_path / "mutant.prototxt"
        net.write_bytes(data)
        try:
            rewrite.rewrite_text(data.decode(), rewrite.Options(classes=3))
            continue                       # only mutants the library refuses
        except (CaffetuneError, UnicodeDecodeError):
            pass
        for args in commands(net, tmp_path / "m.dot"):
            done = subprocess.run([sys.executable, "-m", "caffetune", *args], capture_output=True, text=True,
                                  timeout=120)
            assert "Traceback" not in done.stderr, f"{args[0]} on {what}: {done.stderr[-600:]}"
            if args[0] == "rewrite":
                assert done.returncode != 0 and done.stderr.startswith("error: "), (what, done.stderr)
        checked += 1
