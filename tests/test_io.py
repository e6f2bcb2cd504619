"""Atomic outputs: a killed writer leaves only a temporary, never the file; the next writer of the
same file removes that temporary."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from e2epath.core.io import (
    atomic_path,
    read_json,
    remove_stale_temporaries,
    tmp_name,
    write_json,
)


def test_a_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    out = tmp_path / "table.json"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:] = {sys.path!r}
        from e2epath.core.io import atomic_path
        with atomic_path({str(out)!r}) as tmp:
            tmp.write_text("half a table")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".table.json.tmp-") and not out.exists()
    write_json(out, {"rows": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json"]
    assert read_json(out) == {"rows": 3}


def test_only_temporaries_of_that_file_are_removed(tmp_path):
    out = tmp_path / "a.tsv"
    others = [tmp_path / ".b.tsv.tmp-1", tmp_path / ".a.tsv.bak", tmp_path / "a.tsv.tmp-2"]
    for p in others:
        p.write_text("x")
    (tmp_path / ".a.tsv.tmp-77").mkdir()  # a killed folder writer's temporary (figures)
    (tmp_path / ".a.tsv.tmp-77" / "f").write_text("x")
    with atomic_path(out) as tmp:
        assert tmp == tmp_name(out) and tmp.name not in {p.name for p in tmp_path.iterdir()}
        tmp.write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in others)])
    assert remove_stale_temporaries(out) == []
