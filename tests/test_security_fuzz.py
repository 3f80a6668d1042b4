"""Property: whatever spec and paths arrive, the CLI ends in 0/1/2 quickly, leaks no secret,
and touches no file it was not asked to write (issue #19; the long run is benchmarks/fuzz_cli.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.hostile import SECRET, SPEC_NAME, Sandbox, commands, run_cli

SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def test_hostile_cli_calls_end_cleanly(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KMEC_HOSTILE_SECRET", SECRET)
    box = Sandbox(tmp_path_factory.mktemp("hostile"))

    @SETTINGS
    @given(commands())
    def check(case: tuple[str, list[str]]) -> None:
        text, argv = case
        (box.specs / SPEC_NAME).write_text(text)
        out = run_cli(argv, cwd=box.repo, timeout=60)
        assert not out.hung, argv
        assert out.crash is None, (argv, out.crash)
        assert out.code in (0, 1, 2), (argv, out.code, out.output[-500:])
        if not (argv[0] == "check" and argv[1].endswith(".kmec") and argv[1] != "specs/spec.kmec"
                and not (box.repo / argv[1]).is_symlink()):
            assert SECRET not in out.output, (argv, out.output[-500:])
        # compile/apply/... may write only their own outputs: nothing protected changes
        assert box.touched(allowed=("repo/build", "repo/out", "repo/fresh")) == [], argv

    check()
