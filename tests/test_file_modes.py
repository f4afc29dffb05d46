"""Files plvmctl writes atomically are readable as any file the user writes: a new one gets
0644, a replaced one keeps its mode (the temporary file they start as is private, 0600)."""

import stat

from plvmctl.fileio import NEW_FILE_MODE, write_json_atomic, write_text_atomic


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_usual_mode(tmp_path):
    write_json_atomic(tmp_path / "report.json", {"a": 1})
    assert mode(tmp_path / "report.json") == NEW_FILE_MODE == 0o644


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.txt"
    path.write_text("old")
    path.chmod(0o664)
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o664


def test_a_secret_is_private_from_its_first_byte(tmp_path):
    path = tmp_path / "users.json"
    path.write_text("{}")
    path.chmod(0o644)
    write_json_atomic(path, {"key_hash": "x"}, mode=0o600)
    assert mode(path) == 0o600
