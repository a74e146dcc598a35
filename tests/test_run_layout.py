"""The run folder's layout: one object for the workflow and the package."""

from __future__ import annotations

from pathlib import Path

from wsi_asmil.core.run_layout import RunLayout, fold_checkpoint, link_from_report


def test_paths_keep_snakemake_wildcards_and_fill_values() -> None:
    run = RunLayout("results/", "0.5mpp_224px", "efficientnet_lite0")
    assert run.root == "results"
    assert run.features() == "results/features/0.5mpp_224px/efficientnet_lite0/{slide}.zarr"
    assert run.features("s 1") == "results/features/0.5mpp_224px/efficientnet_lite0/s 1.zarr"
    assert run.checkpoint() == "results/models/{model}/fold{fold}/model.pt"
    assert Path(run.checkpoint("asmil", 2)) == fold_checkpoint(run.models("asmil"), 2)
    assert run.scores("abmil") == "results/heatmaps/abmil/scores"
    assert run.predict().tiles("x") == "results/predict/tiles/0.5mpp_224px/x.zarr"
    assert run.predict().inventory == "results/predict/inventory/slides.csv"


def test_report_links_are_relative_so_the_run_folder_can_move() -> None:
    run = RunLayout("/data/run1")
    assert link_from_report(run.report, run.heatmap_image("asmil", "s 1")) == "../heatmaps/asmil/s 1.png"
    assert link_from_report(run.report, run.predict().heatmap_image("asmil", "n")) == "../predict/heatmaps/asmil/n.png"
