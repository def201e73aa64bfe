"""The committed stubs in xdc/v1 must equal what `make proto` generates now."""

import pathlib

from xdc import protogen


def test_committed_stubs_are_fresh(tmp_path: pathlib.Path) -> None:
    generated = {f.name: f.read_bytes() for f in protogen.generate(tmp_path)}
    committed_dir = protogen.ROOT / "xdc" / "v1"
    committed = {f.name: f.read_bytes() for f in committed_dir.glob("*_pb2*.py*")}
    assert set(generated) == set(committed), "run `make proto`: stub files differ"
    stale = sorted(name for name in generated if generated[name] != committed[name])
    assert not stale, f"run `make proto`: stale stubs {stale}"
