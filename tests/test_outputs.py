"""Durability of the output files: a rename is only kept across a power cut once its folder is fsynced."""
import os
import stat

from fl_sim.results import outputs


def test_every_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", (info.st_dev, info.st_ino)))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    monkeypatch.setattr(outputs.os, "replace", replace)
    folder = tmp_path / "run" / "round-001"
    outputs.write_json(folder / "summary.json", {"psnr": 1.0})

    folder_id = (os.stat(folder).st_dev, os.stat(folder).st_ino)
    kinds = [event[:2] for event in events]
    assert kinds == [("fsync", "file"), ("replace", str(folder / "summary.json")), ("fsync", "dir")]
    assert events[-1][2] == folder_id  # the folder that holds the renamed file, not some other
    assert outputs.read_jsonl(folder / "missing.jsonl") == []
