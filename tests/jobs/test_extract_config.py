"""``tal extract --config FILE.yaml``, ``--set`` and ``--print-config``: the layers' precedence
(defaults < YAML < explicit flags < --set), unknown keys, the printed YAML's round trip, and one
real extraction whose store provenance shows the YAML's sampling."""

from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.extract import ExtractSettings, load_settings, resolve_settings
from pipelines.backbones import BackboneConfig
from pipelines.extract import SamplingConfig
from pipelines.store import FeatureStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "extract_mobilenet_v2.yaml"


def printed(capsys, *argv: str) -> dict:
    """The settings ``tal extract --print-config`` writes for ``argv``, as a dict."""
    capsys.readouterr()
    assert main(["extract", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_without_yaml_the_built_in_defaults_apply(capsys):
    got = printed(capsys)
    assert got["sampling"] == {"fps": 15.0, "window": 4, "stride": 4, "chunk_frames": 64, "decoder": "pyav"}
    assert got["backbone"]["name"] == "mobilenet_v2" and got["backbone"]["dtype"] == "float32" and got["backbone"]["batch_size"] == 64
    assert (got["num_workers"], got["cpus_per_worker"], got["gpus_per_worker"]) == (None, 1.0, 0.0)
    assert printed(capsys, "--num-gpus", "1")["backbone"]["dtype"] == "float16"  # the dtype follows the GPUs unless set
    assert printed(capsys, "--fps", "0")["sampling"]["fps"] is None  # 0 = the video's own rate


def test_precedence_defaults_yaml_flags_set(tmp_path, capsys):
    config = write_yaml(
        tmp_path / "x.yaml",
        {"backbone": {"batch_size": 16}, "sampling": {"fps": 10, "window": 8, "stride": 8}, "num_workers": 3, "gpus_per_worker": 1},
    )
    got = printed(capsys, "--config", config)
    assert got["sampling"] == {"fps": 10.0, "window": 8, "stride": 8, "chunk_frames": 64, "decoder": "pyav"}
    assert (got["backbone"]["batch_size"], got["num_workers"], got["backbone"]["dtype"]) == (16, 3, "float16")
    # Explicit flags beat the YAML; flags left out (batch size, workers, fps) keep the YAML's values.
    got = printed(capsys, "--config", config, "--window", "2", "--stride", "2", "--dtype", "bfloat16")
    assert got["sampling"] == {"fps": 10.0, "window": 2, "stride": 2, "chunk_frames": 64, "decoder": "pyav"}
    assert (got["backbone"]["batch_size"], got["num_workers"], got["backbone"]["dtype"]) == (16, 3, "bfloat16")
    # --set beats both, values parsed as YAML.
    got = printed(capsys, "--config", config, "--fps", "12", "--set", "sampling.fps=5", "--set", "backbone.mean=[0.5, 0.5, 0.5]",
                  "--set", "num_workers=null")  # fmt: skip
    assert got["sampling"]["fps"] == 5.0 and got["backbone"]["mean"] == [0.5, 0.5, 0.5] and got["num_workers"] is None
    assert printed(capsys, "--config", config, "--fps", "12")["sampling"]["fps"] == 12.0


def test_decoder_flag_yaml_and_set(tmp_path, capsys):
    assert printed(capsys, "--decoder", "torchcodec")["sampling"]["decoder"] == "torchcodec"
    config = write_yaml(tmp_path / "x.yaml", {"sampling": {"decoder": "decord"}})
    assert printed(capsys, "--config", config)["sampling"]["decoder"] == "decord"
    assert printed(capsys, "--config", config, "--decoder", "pyav")["sampling"]["decoder"] == "pyav"
    assert printed(capsys, "--set", "sampling.decoder=torchcodec")["sampling"]["decoder"] == "torchcodec"


def test_yaml_dtype_is_kept_with_gpus(tmp_path, capsys):
    config = write_yaml(tmp_path / "x.yaml", {"backbone": {"dtype": "float32"}, "gpus_per_worker": 0.5})
    assert printed(capsys, "--config", config)["backbone"]["dtype"] == "float32"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--backbone", "resnet50", "--flow", "--fps", "0", "--window", "16", "--stride", "8", "--num-workers", "2", "--num-gpus", "0.5"],
        ["--set", "backbone.name=torchscript", "--set", "backbone.weights=/m.pt", "--set", "backbone.kind=clip",
         "--set", "backbone.input_size=[112, 112]", "--set", "backbone.clip_length=8", "--set", "sampling.chunk_frames=32"],
    ],
)  # fmt: skip
def test_print_config_loads_back_identically(argv, tmp_path, capsys):
    capsys.readouterr()
    assert main(["extract", *argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    expected = resolve_settings(None, _flags(argv), [a for i, a in enumerate(argv) if i and argv[i - 1] == "--set"])
    assert load_settings(path) == expected
    assert isinstance(expected.backbone.mean, tuple)  # lists in the YAML come back as the dataclass's tuples
    # ... and printing it again from the file gives the same text.
    assert main(["extract", "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == text


def _flags(argv: list[str]) -> dict:
    from jobs.cli import build_parser

    return vars(build_parser().parse_args(["extract", *argv]))


@pytest.mark.parametrize(
    "data, needles",
    [
        ({"sampling": {"fsp": 10}}, ["bad.yaml.sampling", "'fsp'", "chunk_frames", "window"]),
        ({"backbone": {"nmae": "resnet50"}}, ["bad.yaml.backbone", "'nmae'", "batch_size"]),
        ({"workers": 2}, ["bad.yaml", "'workers'", "num_workers", "sampling"]),
        ({"sampling": {"window": 0}}, ["bad.yaml.sampling", "window"]),
        ({"num_workers": 0}, ["bad.yaml", "num_workers"]),
        ({"sampling": [15, 4, 4]}, ["bad.yaml.sampling", "mapping"]),
    ],
)
def test_bad_yaml_exits_2_naming_the_path(data, needles, tmp_path, capsys):
    config = write_yaml(tmp_path / "bad.yaml", data)
    assert main(["extract", "--videos", ".", "--out", str(tmp_path / "s"), "--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--set", "sampling.fsp=10"], ["--set sampling.fsp", "no such key", "chunk_frames"]),
        (["--set", "smpling.fps=10"], ["--set smpling.fps", "'smpling'", "sampling"]),
        (["--set", "sampling=10"], ["--set sampling", "section"]),
        (["--set", "sampling.fps"], ["expected key=value"]),
        (["--set", "sampling.window=0"], ["--set.sampling", "window"]),
        (["--window", "0", "--set", "sampling.fps=10"], ["sampling:", "window"]),
        ([], ["--videos and --out are required"]),
    ],
)
def test_bad_set_and_missing_paths_exit_2(argv, needles, capsys):
    assert main(["extract", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err


def test_example_yaml_is_the_demo_extraction():
    settings = load_settings(EXAMPLE)
    assert settings == ExtractSettings(BackboneConfig(name="mobilenet_v2"), SamplingConfig(fps=15.0, window=4, stride=4))


def test_extract_with_a_config_yaml(tmp_path, ray_session, capsys):
    archive, store = tmp_path / "archive", tmp_path / "store"
    assert main(["synth", "--out", str(archive), "--videos", "1", "--seed", "3", "--duration-range", "3", "3", "--size", "160x120", "--workers", "1"]) == 0
    config = write_yaml(tmp_path / "extract.yaml", {"sampling": {"fps": 6, "window": 3, "stride": 2}, "num_workers": 1, "backbone": {"batch_size": 8}})
    capsys.readouterr()
    assert main(["extract", "--videos", str(archive / "videos"), "--out", str(store), "--config", config, "--stride", "3", "--no-progress"]) == 0
    assert "1 extracted, 0 failed" in capsys.readouterr().out
    provenance = FeatureStore(str(store)).provenance
    assert (provenance.backbone, provenance.fps, provenance.window, provenance.stride) == ("mobilenet_v2", 6.0, 3, 3)
    (sequence,) = FeatureStore(str(store)).read_all().values()
    assert sequence.features.shape[1] == 1280
