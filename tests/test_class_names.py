"""utils/class_names.py: the class_names / words.txt file of readable names."""
from __future__ import annotations

import pytest

from utils.class_names import read_name_file
from utils.errors import DataError


def test_a_name_file_that_is_not_utf8_names_the_file(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("n001\tcat, house cat\nn002\tdog\n", encoding="utf-8")
    assert read_name_file(str(words), ["n001", "n002"]) == {"n001": "cat, house cat", "n002": "dog"}
    words.write_bytes(b"n001\tcat\nn002\tcaf\xe9\n")          # Latin-1
    with pytest.raises(DataError, match=rf"class_names file {words} is not UTF-8 text"):
        read_name_file(str(words), ["n001", "n002"])


def test_a_name_file_that_is_a_folder_or_missing_says_which(tmp_path):
    with pytest.raises(DataError, match=rf"class_names file {tmp_path} is a folder, not a file"):
        read_name_file(str(tmp_path), ["n001"])
    with pytest.raises(DataError, match=rf"class_names file {tmp_path / 'no.txt'} does not exist"):
        read_name_file(str(tmp_path / "no.txt"), ["n001"])
