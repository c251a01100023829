"""A bounded libFuzzer run (ASan + UBSan) over the C keeper's request handling, from the
checked-in corpus: any crash, leak of a descriptor, or broken invariant (keeper/fuzz.c) fails
the suite. `make fuzz-keeper FUZZ_SECONDS=600` runs it longer."""

from __future__ import annotations

from pathlib import Path

from tests.support.fuzzing import fuzz_run

KEEPER = Path(__file__).resolve().parents[2] / "keeper"


def test_the_keeper_survives_a_fuzz_run(tmp_path: Path) -> None:
    fuzz_run(tmp_path, [KEEPER / "fuzz.c", KEEPER / "keeper.c"], KEEPER / "corpus", "the keeper",
             runs=300_000, defines=("-DKEEPER_FUZZING",))
