"""``raftseq keygen``: a node key a node accepts as its ``raft_key_file``, never overwritten."""

from __future__ import annotations

import os
import stat

from raftseq.cluster.cli.command import main
from raftseq.cluster.config import read_node_key


def public_key_line(capsys) -> str:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return out[0]


def test_keygen_makes_a_private_key_file_whose_public_key_it_prints(tmp_path, capsys):
    path = tmp_path / "n4.key"
    assert main(["keygen", str(path)]) == 0
    line = public_key_line(capsys)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    _, public_key = read_node_key(str(path))  # what a node reads at start
    assert line == f'raft_public_key = "{public_key.hex()}"'
    assert main(["keygen", "--show", str(path)]) == 0
    assert public_key_line(capsys) == line


def test_keygen_never_overwrites_a_key_and_says_why(tmp_path, capsys):
    path = tmp_path / "n4.key"
    assert main(["keygen", str(path)]) == 0
    before = path.read_bytes()
    capsys.readouterr()
    assert main(["keygen", str(path)]) == 1
    err = capsys.readouterr().err
    assert "never overwritten" in err and err.count("\n") == 1
    assert path.read_bytes() == before


def test_keygen_errors_are_one_line(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "missing" / "n4.key")]) == 1
    assert main(["keygen", "--show", str(tmp_path / "none.key")]) == 1
    (tmp_path / "bad.key").write_text("not a key\n")
    os.chmod(tmp_path / "bad.key", 0o600)
    assert main(["keygen", "--show", str(tmp_path / "bad.key")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("raftseq keygen: ") for line in err), err
