"""Numbers as users write them: `lr: 1e-4` (every paper's LR) is a float, in config files and overrides alike.

PyYAML reads YAML 1.1, where a float needs a dot and a signed exponent: `1e-4` was the string '1e-4' and
`train.lr=1e-4` was refused ("expected a number, got '1e-4'"). Expected values here are Python literals.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from distributed import REPO, rank_env

from dtr_scale.config import ConfigError, load_config

# (text as written, the float it means): the forms of casanovo #64, LlamaFactory #4014, trl #1450 and kin.
FLOAT_FORMS = [
    ("1e-4", 1e-4),
    ("3e-4", 3e-4),
    ("1E-4", 1e-4),
    ("2.5e-4", 2.5e-4),
    ("1.0e-3", 1e-3),
    ("1.0e3", 1000.0),  # YAML 1.1 wants a signed exponent
    ("+1e-3", 1e-3),
    ("5e-1", 0.5),
    (".5e-3", 0.5e-3),
    ("0.0001", 1e-4),  # 1.1 forms still read as before
    ("1.5e-3", 1.5e-3),
]


def _config_file(tmp_path, body: str):
    path = tmp_path / "run.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(("text", "value"), FLOAT_FORMS, ids=[t for t, _ in FLOAT_FORMS])
def test_a_float_written_with_an_exponent_is_a_float_in_a_config_file(tmp_path, text, value):
    cfg = load_config(_config_file(tmp_path, f"train:\n  lr: {text}\n"))
    assert cfg.train.lr == value and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(("text", "value"), FLOAT_FORMS, ids=[t for t, _ in FLOAT_FORMS])
def test_a_float_written_with_an_exponent_is_a_float_as_an_override(text, value):
    cfg = load_config(REPO / "configs/demo-cpu.yaml", [f"train.lr={text}"])
    assert cfg.train.lr == value and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(("text", "value"), [("-1e-4", -1e-4), ("-.5", -0.5), ("-2E-3", -2e-3)])
def test_negative_exponent_forms_are_numbers_so_range_checks_speak_about_the_value(text, value):
    # a negative LR is refused for being negative, not for being a string
    with pytest.raises(ConfigError, match=rf"train\.lr must be > 0, got {value}"):
        load_config(REPO / "configs/demo-cpu.yaml", [f"train.lr={text}"])


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("train.max_steps", "3e5", 300_000),
        ("train.max_steps", "1e3", 1000),
        ("train.max_steps", "1E3", 1000),
        ("deepspeed.reduce_bucket_size", "5e7", 50_000_000),
        ("train.checkpoint_every", "2.0e3", 2000),
        ("train.max_steps", "1000.0", 1000),
    ],
)
def test_an_integral_number_is_an_int_where_the_key_is_an_int(key, text, value):
    section, name = key.split(".")
    cfg = load_config(REPO / "configs/demo-cpu.yaml", [f"{key}={text}"])
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is int


@pytest.mark.parametrize("text", ["2.5e-1", "2.5", "1e400", ".nan"])
def test_a_fractional_or_infinite_number_is_refused_where_the_key_is_an_int(text):
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got"):
        load_config(REPO / "configs/demo-cpu.yaml", [f"train.max_steps={text}"])


@pytest.mark.parametrize("key", ["train.lr", "routing.beta", "repa.coeff", "train.grad_clip"])
@pytest.mark.parametrize("text", [".nan", ".NaN", ".inf", "-.inf", "1e400"])
def test_nan_and_infinity_are_refused_for_every_float_key(tmp_path, key, text):
    # NaN passes every range check (nan <= 0 is False): train.lr=.nan used to plan a run with a NaN LR.
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number, got -?(nan|inf)"):
        load_config(_config_file(tmp_path, f"{section}:\n  {name}: {text}\n"))
    with pytest.raises(ConfigError, match=rf"override {key}={text}: {key}: expected a finite number"):
        load_config(REPO / "configs/demo-cpu.yaml", [f"{key}={text}"])


def test_nan_written_as_a_word_says_how_yaml_spells_it():
    with pytest.raises(
        ConfigError, match=r"train\.lr: expected a number, got 'nan' \(YAML writes them \.nan"
    ):
        load_config(REPO / "configs/demo-cpu.yaml", ["train.lr=nan"])


@pytest.mark.parametrize("text", ["1e", "e5", "1e-4x", "1.2.3", "1e-4.5"])
def test_text_that_only_looks_like_a_number_stays_a_string(text):
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got '"):
        load_config(REPO / "configs/demo-cpu.yaml", [f"train.lr={text}"])


def test_ints_and_yaml_1_1_spellings_keep_their_meaning(tmp_path):
    cfg = load_config(_config_file(tmp_path, "train:\n  max_steps: 1_000\n  seed: 0x10\n  lr: .5\n"))
    assert (cfg.train.max_steps, cfg.train.seed, cfg.train.lr) == (1000, 16, 0.5)
    assert type(cfg.train.max_steps) is int and type(cfg.train.seed) is int


def test_an_override_that_is_not_yaml_is_one_error_naming_it():
    with pytest.raises(ConfigError, match=r"override 'train\.betas=\[0\.9': the value is not valid YAML"):
        load_config(REPO / "configs/demo-cpu.yaml", ["train.betas=[0.9"])


def test_the_cli_takes_paper_notation_in_the_file_and_on_the_command_line(tmp_path):
    config = tmp_path / "paper.yaml"
    config.write_text((REPO / "configs/demo-cpu.yaml").read_text().replace("lr: 0.001", "lr: 1e-4"))
    cmd = [sys.executable, "-m", "dtr_scale", "train", "--config", str(config), "--dry-run",
           "train.max_steps=3e5", "train.ema_decay=9.999E-1", "data.shards=/nonexistent/manifest.json"]  # fmt: skip
    out = subprocess.run(cmd, env=rank_env(0, 1, 0), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lr: 0.0001\n" in out.stdout and "max_steps: 300000\n" in out.stdout
    assert "ema_decay: 0.9999\n" in out.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--model", "m", "--out", "o", "--cfg-scale", "nan"],
        ["sample", "--model", "m", "--out", "o", "--guidance-high", "inf"],
        ["demo", "--cfg-scale=-inf"],
        ["preprocess", "--input", "i", "--vae", "v", "--out", "o", "--max-skipped-fraction", "nan"],
        ["affinity", "--model", "m", "--max-memory-gb", "inf"],
    ],
)
def test_float_flags_refuse_nan_and_infinity_in_one_line(argv, capsys):
    from dtr_scale.cli import main

    with pytest.raises(SystemExit) as info:  # argparse's own exit, before any work
        main(argv)
    assert info.value.code == 2
    assert "expected a finite number, got" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--sampler", "bogus"], "argument --sampler: invalid choice: 'bogus'"),
        (["--samples-per-class", "0"], "argument --samples-per-class: expected a positive integer, got '0'"),
        (["--sample-steps", "0"], "argument --sample-steps: expected a positive integer, got '0'"),
        (["--fid-samples", "-1"], "argument --fid-samples: expected a positive integer, got '-1'"),
        (["--min-accuracy", "2"], "argument --min-accuracy: expected a number in [0, 1], got '2'"),
        (["--threads", "1.5"], "argument --threads: expected a positive integer, got '1.5'"),
        (["--sampler", "heun"], "--sampler heun does not sample a ddpm model"),
    ],
)
def test_demo_refuses_bad_flags_before_any_work(tmp_path, capsys, flags, expected):
    # A fresh user's `dtr-scale demo --sampler bogus` trained 2000 steps before failing.
    from dtr_scale.cli import main

    try:
        code = main(["demo", "--out", str(tmp_path / "demo"), *flags])
    except SystemExit as exit_:  # argparse's own exit
        code = exit_.code
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
