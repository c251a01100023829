"""A bounded libFuzzer run (ASan + UBSan) over pinion-cni's parsers of untrusted bytes (the
network config on stdin, CNI_ARGS, the agent's reply), from the checked-in corpus: any crash,
undefined behaviour, leak, or JSON we produce that does not parse again (cni/fuzz.c) fails
the suite. `make fuzz-cni FUZZ_SECONDS=600` runs it longer."""

from __future__ import annotations

from pathlib import Path

from tests.support.fuzzing import fuzz_run

CNI = Path(__file__).resolve().parents[2] / "cni"


def test_the_cni_plugins_parsers_survive_a_fuzz_run(tmp_path: Path) -> None:
    fuzz_run(tmp_path, [CNI / "fuzz.c", CNI / "cnicore.c", CNI / "cnijson.c"], CNI / "corpus",
             "pinion-cni", runs=200_000, libs=("-lm",))
