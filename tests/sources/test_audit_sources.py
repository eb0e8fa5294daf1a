"""`bit audit` over every local DATA kind: the same images as class folders, a CSV, parquet shards and a
save_to_disk folder give the same inventory and counts; a data set of rows cannot be written back as a label
file (--write-clean is refused, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_main


@pytest.fixture(scope="module")
def audits(sources: dict[str, Path], tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("audits")
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITCLI_CACHE", str(out / "cache"))
        for kind in ("folder", "csv", "parquet", "saved"):
            code, _, err = run_main("audit", sources[kind], "-m", tiny_dir, "-o", out / kind, "--workers", "0")
            assert code == 0, err
            found[kind] = json.loads((out / kind / "audit.json").read_text())
    return found


@pytest.mark.parametrize("kind", ["csv", "parquet", "saved"])
def test_every_source_gives_the_folder_s_inventory_and_counts(audits: dict[str, dict], kind: str) -> None:
    folder, other = audits["folder"], audits[kind]
    assert other["counts"] == folder["counts"]
    assert other["inventory"]["splits"] == folder["inventory"]["splits"]
    assert list(other["inventory"]["splits"]) == ["train", "validation"]
    assert other["inventory"]["splits"]["train"]["classes"] == {"blue": 8, "green": 8, "red": 8}


def test_rows_of_a_data_set_are_not_written_as_a_label_file(
    sources: dict[str, Path], tiny_dir: Path, tmp_path: Path
) -> None:
    clean = tmp_path / "clean.csv"
    code, out, err = run_main("audit", sources["parquet"], "-m", tiny_dir, "--write-clean", clean)
    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"Error: --write-clean {clean}: DATA's images are rows of a data set, not files, so a label file cannot "
        "list them; audit a class folder or a label file to write one"
    )
    assert not clean.exists()
