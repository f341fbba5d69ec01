"""The `lorafleet` command itself: flags in any position, the one error contract (a
LorafleetError prints `error: ...` and exits 2, without importing torch), Ctrl-C during a real
training run, and `lorafleet serve CONFIG` started, asked, and stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT, our_lines

from cluster.cli.main import Invocation, parse

# one command line per subcommand; FLAGS names the words that are one flag (with its value)
CASES = {
    "validate": (
        ["validate", "a.yaml", "b.yaml", "training.max_steps=5"],
        ["--print"],
        Invocation(
            "validate",
            {
                "configs": ["a.yaml", "b.yaml"],
                "overrides": ["training.max_steps=5"],
                "print_config": True,
            },
        ),
    ),
    "train": (
        ["train", "c.yaml", "training.max_steps=5", "name=x"],
        ["--resume"],
        Invocation(
            "train",
            {
                "config": "c.yaml",
                "overrides": ["training.max_steps=5", "name=x"],
                "resume": True,
                "release": None,
            },
        ),
    ),
    "tune": (
        ["tune", "c.yaml", "tune.num_samples=2", "name=x"],
        ["--release", "s.yaml"],
        Invocation(
            "tune",
            {
                "config": "c.yaml",
                "overrides": ["tune.num_samples=2", "name=x"],
                "resume": False,
                "release": "s.yaml",
            },
        ),
    ),
    "merge": (
        ["merge", "store/adapters/a"],
        ["--out", "merged/"],
        Invocation("merge", {"adapter": "store/adapters/a", "out": "merged/", "dtype": "float32"}),
    ),
    "release": (
        ["release", "status", "s.yaml", "bot"],
        ["--follow"],
        Invocation(
            "release",
            {
                "action": "status",
                "config": "s.yaml",
                "overrides": [],
                "adapter": "bot",
                "url": None,
                "follow": True,
            },
        ),
    ),
    "adapters": (
        ["adapters", "promote", "a", "20261202-003015-123-9f3a"],
        ["--root", "s3://b/r"],
        Invocation(
            "adapters",
            {
                "action": "promote",
                "name": "a",
                "version": "20261202-003015-123-9f3a",
                "root": "s3://b/r",
                "config": None,
            },
        ),
    ),
    "serve": (
        ["serve", "s.yaml", "http.port=9000", "name=y"],
        [],  # plain serve takes no flag: the case below checks its words in any order
        Invocation("serve", {"config": "s.yaml", "overrides": ["http.port=9000", "name=y"]}),
    ),
    "serve set-weights": (
        ["serve", "set-weights", "s.yaml", "bot", "a=50", "b=50"],
        ["--url", "http://127.0.0.1:9"],
        Invocation(
            "serve set-weights",
            {
                "config": "s.yaml",
                "experiment": "bot",
                "weights": {"a": 50.0, "b": 50.0},
                "url": "http://127.0.0.1:9",
            },
        ),
    ),
    "serve eval": (
        ["serve", "eval", "s.yaml", "tiny:a", "rows.jsonl"],
        ["--limit", "7"],
        Invocation(
            "serve eval",
            {"config": "s.yaml", "model": "tiny:a", "data": "rows.jsonl", "url": None, "limit": 7},
        ),
    ),
    "eval": (
        ["eval", "c.yaml", "eval.limit=5"],
        [],  # no flags: every setting is an `eval.*` override
        Invocation("eval", {"config": "c.yaml", "overrides": ["eval.limit=5"]}),
    ),
    "demo": (
        ["demo", "d.yaml", "training.max_steps=5"],
        ["--json"],
        Invocation(
            "demo", {"config": "d.yaml", "overrides": ["training.max_steps=5"], "json_report": True}
        ),
    ),
    "submit": (
        ["submit", "train", "c.yaml", "training.max_steps=5"],
        ["--env", "HF_TOKEN"],
        Invocation(
            "submit",
            {
                "command": "train",
                "config": "c.yaml",
                "overrides": ["training.max_steps=5"],
                "address": None,
                "env": ["HF_TOKEN"],
                "follow": True,
            },
        ),
    ),
    "doctor": (
        ["doctor", "c.yaml", "ray.address=auto"],
        [],  # no flag: its words may come in any order
        Invocation("doctor", {"config": "c.yaml", "overrides": ["ray.address=auto"]}),
    ),
    "plan": (
        ["plan", "c.yaml", "training.batch_size=2"],
        ["--gpu", "L4-24GB"],
        Invocation(
            "plan",
            {
                "config": "c.yaml",
                "overrides": ["training.batch_size=2"],
                "gpu": "L4-24GB",
                "gpu_gib": None,
            },
        ),
    ),
}
# the flag at every position after the command's name (`serve set-weights --url U C ...` too)
POSITIONS = [
    (name, i) for name, (words, flag, _) in CASES.items() for i in range(1, len(words) + 1) if flag
]


@pytest.mark.parametrize("name, at", POSITIONS, ids=[f"{n}@{i}" for n, i in POSITIONS])
def test_a_flag_means_the_same_in_every_position(name, at):
    words, flag, want = CASES[name]
    argv = words[:at] + flag + words[at:]
    assert parse(argv) == want, argv


def test_set_weights_sends_every_weight_whatever_stands_between_them():
    # the bug: words after --url were dropped, so only a=50 was sent
    argv = ["serve", "set-weights", "C", "EXP", "a=50", "--url", "U", "b=50"]
    assert parse(argv).params["weights"] == {"a": 50.0, "b": 50.0}
    # plain serve takes no flag: its overrides may stand before or after the config
    words, _, want = CASES["serve"]
    assert parse(["serve", words[2], words[1], words[3]]) == want
    both = ["serve", "eval", "C", "M", "--url", "U", "D", "--limit", "3"]
    assert parse(both).params == {
        "config": "C",
        "model": "M",
        "data": "D",
        "url": "U",
        "limit": 3,
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "set-weights", "C", "EXP", "a=fifty"], "expected VARIANT=WEIGHT (a number)"),
        (["serve", "set-weights", "C", "EXP"], "usage: lorafleet serve set-weights"),
        (["serve", "eval", "C", "M", "D", "--limit", "0"], "--limit must be at least 1. Got 0"),
        (["serve", "c.yaml", "--url", "U"], "--url and --limit are for"),
        (["train", "a.yaml", "b.yaml"], "expected one CONFIG"),
        (["train", "--resume"], "expected a CONFIG file"),
        (["train", "a.yaml", "--bogus"], "unrecognized arguments: --bogus"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_usage_errors_exit_2_naming_the_problem(argv, message, capsys):
    from cluster.cli.main import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_lorafleet_error_is_one_line_and_exit_2_without_importing_torch(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {path: x.jsonl}\ntraining: {max_step: 3}\n")
    code = (
        "import sys\nfrom cluster.cli.main import main\n"
        f"rc = main(['train', {str(cfg)!r}])\n"
        "print(sorted(m for m in ('torch', 'train', 'tune', 'serve', 'ray') if m in sys.modules))\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: 1 problem(s) in ") and "Traceback" not in proc.stderr
    assert (
        "training.max_step" in proc.stderr and "Did you mean 'training.max_steps'?" in proc.stderr
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # nothing heavy imported to say so


def _ray_processes_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]


def _gone(procs: list[psutil.Process], timeout_s: float) -> list[str]:
    """The processes still running after timeout_s (zombies count as gone)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline()[:3])}")
        except psutil.NoSuchProcess:
            pass
    return left


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_train_says_how_to_resume_and_exits_130(tmp_path, tiny_base, task_data):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        json.dumps(
            {
                "name": "interrupted",
                "model": {"base": str(tiny_base)},
                "quantization": {"mode": "4bit", "compute_dtype": "float32"},
                "adapter": {"r": 8, "alpha": 16},
                "data": {"path": str(task_data["train"]), "max_length": 64},
                # far more steps than the test waits for: it is stopped while training
                "training": {
                    "max_steps": 5000,
                    "batch_size": 4,
                    "log_every_steps": 1,
                    "eval_every_steps": 1000,
                    "eval_max_batches": 1,
                    "warmup_steps": 0,
                    "gradient_checkpointing": False,
                },
                "scaling": {"num_workers": 1},
                "storage": {"root": str(tmp_path / "store")},
                "ray": {"num_cpus": 2},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "train", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=os.environ | {"RAY_ADDRESS": ""},
        # a shell's background job ignores SIGINT, and Python keeps an ignored SIGINT ignored:
        # give the command the default, as a terminal's Ctrl-C finds it
        preexec_fn=_default_sigint,
    )
    seen = []
    try:
        deadline = time.time() + 400
        for line in proc.stdout:
            seen.append(line)
            if "[train] step 2/5000" in line or time.time() > deadline:
                break
        assert "[train] step 2/5000" in seen[-1], "".join(seen[-30:])
        ray_procs = _ray_processes_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        after, _ = proc.communicate(timeout=180)
        rc = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 130, after[-3000:]
    assert (
        f"interrupted: lorafleet train {cfg} stopped; rerun it with --resume to continue" in after
    ), after[-3000:]
    # Train's placement-group cleaner actor prints a traceback of its own every few seconds when
    # other local Rays run on the machine (it looks its cluster up by address and finds several):
    # Ray's noise, not this command's
    ours = our_lines(after)
    assert not [x for x in ours if "Traceback" in x], after[-3000:]
    # Ray stops its agents last, by SIGTERM; on a loaded 2-core machine that took over 20 s
    assert not _gone(ray_procs, timeout_s=60), "Ray processes outlived the command"


def test_every_command_has_a_case_here():
    from cluster.cli.commands import COMMANDS

    assert set(COMMANDS) == set(CASES)
