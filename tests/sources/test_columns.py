"""One Columns: what --image-column / --label-column ask for (bitcli.sources.locate) and what the data set's
features give (bitcli.sources.features) are the same type, and its text, part of a run's fingerprint, is
unchanged (a run started before still resumes)."""

from __future__ import annotations

from bitcli.sources import features, locate


def test_asked_and_found_columns_are_one_type() -> None:
    assert locate.Columns is features.Columns
    asked = locate.Columns(image=None, label="fine_label")
    assert (asked.image, asked.label, asked.names) == (None, "fine_label", None)


def test_found_columns_read_as_the_fingerprint_has_always_held_them() -> None:
    found = features.Columns(image="img", label="label", names=("cat", "dog"))
    assert f"{found}" == "Columns(image='img', label='label', names=('cat', 'dog'))"
    assert f"{features.Columns(image='image', label='label')}" == "Columns(image='image', label='label', names=None)"
