"""Parameter validation fails before any work, with messages that name the problem."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from flows.params import AlignParams, DownsampleParams
from tests.flows.conftest import tiny_params


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sm": -1.0}, "sm"),
        ({"num_iter": 0}, "num_iter"),
        ({"chunk_xy": 48}, "multiple of the storage chunk"),
        ({"finetune_mip": 2, "coarse_mip": 1}, "render_mip <= finetune_mip <= coarse_mip"),
        ({"coarse_mip": 7}, "but the source has mips 0..2"),
        ({"neighbours": 0}, "neighbours"),
        ({"pad": 200}, "pad"),
        ({"coarse_model": "bspline"}, "coarse_model"),
        ({"bbox_nm": ((1e6, 1e6, 0), (2e6, 2e6, 100))}, "does not overlap"),
    ],
)
def test_bad_values_fail_validation(tmp_path, tiny_stack, overrides, message):
    with pytest.raises(ValidationError, match=message):
        tiny_params(tmp_path / "out", tiny_stack, **overrides)


def test_missing_layers_fail_validation(tmp_path, tiny_stack):
    with pytest.raises(ValidationError, match="no layer at .*nowhere"):
        AlignParams(source=str(tmp_path / "nowhere"), output=str(tmp_path / "out"))
    with pytest.raises(ValidationError, match="defects: no layer at"):
        tiny_params(tmp_path / "out", tiny_stack, defects=str(tmp_path / "no_mask"))
    with pytest.raises(ValidationError, match="layer: no layer at"):
        DownsampleParams(layer=str(tmp_path / "nothing"))


def test_unknown_parameter_is_rejected(tmp_path, tiny_stack):
    with pytest.raises(ValidationError, match="finetune_mips"):
        tiny_params(tmp_path / "out", tiny_stack, finetune_mips=2)


def test_cli_reports_invalid_parameters_without_running(tmp_path, tiny_stack):
    result = CliRunner().invoke(app, ["align-stack", "--source", tiny_stack["misaligned"], "--output",
                                      str(tmp_path / "out"), "--set", "sm=-5"])
    assert result.exit_code == 2
    assert "invalid parameters" in result.output and "sm" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_help_lists_the_stages():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("normalize", "detect", "encode", "coarse-align", "finetune", "solve", "render",
                    "downsample", "align-stack", "demo", "serve"):
        assert command in result.output


def test_deployments_cover_every_flow_with_a_paused_schedule():
    from flows.deployments import deployments

    deps = {d.name: d for d in deployments()}
    for name in ("normalize", "detect_defects", "encode", "coarse_align", "finetune", "solve", "render",
                 "downsample"):
        assert f"{name}-local" in deps
    assert deps["align_stack-local"].schedules and deps["align_stack-local"].paused


def test_coarse_mip_whose_sections_do_not_fit_is_refused_with_the_mip_that_fits(tmp_path, monkeypatch):
    import flows.params as params_module

    monkeypatch.setattr(params_module, "MAX_COARSE_PX", 100)  # the bundled-size layer below: 256 px at mip 0
    from emcore.layers import create_layer

    path = "file://" + str(tmp_path / "src")
    create_layer(path, kind="image", resolution=(4.6, 4.6, 50), size=(256, 256, 2), chunk_size=(64, 64, 1),
                 num_mips=3, dtype="uint8")
    with pytest.raises(ValueError, match=r"coarse_mip=0 gives sections of 256 px.*use coarse_mip=2"):
        params_module.AlignParams(source=path, output=str(tmp_path / "out"), coarse_mip=0, finetune_mip=0,
                                  chunk_xy=64)


def test_plan_prints_each_stage_in_physical_units_and_chooses_mips(tmp_path, tiny_stack):
    result = CliRunner().invoke(app, ["plan", "--source", tiny_stack["misaligned"], "--output",
                                      str(tmp_path / "out")], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = result.output
    for stage in ("normalize:", "coarse_align:", "finetune:", "solve:", "render:"):
        assert stage in text, text
    # the tiny stack: 256 px at 4.6 nm. 16 nm/px would be mip 2, but its sections would be 64 px,
    # under the finetuner's 128 px minimum: mip 1 (9.2 nm/px), and the coarse stage stays there too
    assert "normalize: mip 1 (9.2 nm/px), 128 x 128 px per section" in text, text
    assert "finetune: mip 1 (9.2 nm/px)" in text, text
    params = AlignParams(source=tiny_stack["misaligned"], output=str(tmp_path / "out"), chunk_xy=64)
    assert (params.coarse_mip, params.finetune_mip) == (1, 1)


def test_a_task_too_large_for_the_workers_is_refused_naming_the_setting(tmp_path, tiny_stack):
    from flows.plan import TaskMemoryError, check_task_memory, task_memory

    params = tiny_params(tmp_path / "out", tiny_stack)
    need = task_memory(params)
    assert set(need) == {"coarse_align", "finetune", "solve"} and all(v > 0 for v in need.values())
    check_task_memory(params, None)  # no limit: nothing to check
    check_task_memory(params, 64 * 2**30)
    tight = int((512 * 2**20 + need["coarse_align"] - 1) / 0.8)  # room for every task but the coarse one
    with pytest.raises(TaskMemoryError, match=r"a coarse_align task needs .* use a coarser coarse_mip"):
        check_task_memory(params, tight)


def test_align_stack_refuses_before_writing_when_workers_are_too_small(tmp_path, tiny_stack, prefect_api):
    from distributed import LocalCluster

    from flows.align_stack import align_stack
    from flows.plan import TaskMemoryError
    from flows.runtime import use_cluster, worker_memory_limit

    out = tmp_path / "out"
    params = tiny_params(out, tiny_stack)
    with LocalCluster(n_workers=1, processes=False, memory_limit="600MiB", dashboard_address=None) as small:
        with use_cluster(small.scheduler_address):
            assert worker_memory_limit() == 600 * 2**20
        with pytest.raises(TaskMemoryError, match="give the workers more memory"):
            align_stack(params, dask_address=small.scheduler_address)
    assert not out.exists() or not any(p.name != ".sectionflow" for p in out.iterdir())


def test_detect_defects_can_name_the_mask_layer(tmp_path, tiny_stack):
    named = tiny_params(tmp_path / "out", tiny_stack, defects=None, detect_defects=tiny_stack["defects"])
    assert named.defects == tiny_stack["defects"] and named.detect_defects == "none"
    assert named == tiny_params(tmp_path / "out", tiny_stack, detect_defects="none")
    with pytest.raises(ValidationError, match="each name a defect mask: give one"):
        tiny_params(tmp_path / "out", tiny_stack, detect_defects=tiny_stack["misaligned"])
    with pytest.raises(ValidationError, match=r"defects .* has kind image"):
        tiny_params(tmp_path / "out", tiny_stack, defects=None, detect_defects=tiny_stack["misaligned"])
    typo = r"detect_defects='atuo' is neither \"auto\" nor \"none\", so it names a mask layer: .*no layer"
    with pytest.raises(ValidationError, match=typo):
        tiny_params(tmp_path / "out", tiny_stack, defects=None, detect_defects="atuo")
