"""Fault injection: spec parsing, seeded determinism per site, the errors raised, counts that
retry statistics can be checked against."""

from __future__ import annotations

import threading

import pytest

from workbench.errors import RecoverableError, UserError
from workbench.runtime import faults
from workbench.runtime.faults import SITE_ERRORS, SITES, FaultInjector
from workbench.runtime.retry import RetryPolicy, RetryStats


def draws(inj: FaultInjector, site: str, n: int = 200) -> list[bool]:
    return [inj.should_fail(site) for _ in range(n)]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("launch:1.5", "[0, 1]"),
        ("launch:-0.1", "[0, 1]"),
        ("launch:nan", "[0, 1]"),
        ("launch:often", "rate"),
        ("gpu:0.1", "unknown fault site"),
        ("launch", "malformed"),
        ("launch:", "malformed"),
        (":0.1", "malformed"),
        ("launch:0.1,,alloc:0.1", "malformed"),
        ("launch:0.1;alloc:0.2", "rate"),
        ("launch:0.1,launch:0.2", "twice"),
    ],
)
def test_malformed_specs_are_user_errors(spec: str, words: str) -> None:
    with pytest.raises(UserError) as e:
        FaultInjector.from_spec(spec)
    assert e.value.code == "user.bad_faults"
    assert words in e.value.message


def test_bad_api_input_is_a_user_error() -> None:
    inj = FaultInjector()
    with pytest.raises(UserError, match="unknown fault site"):
        inj.set("network", 0.1)
    with pytest.raises(UserError):
        inj.set("launch", 2)
    with pytest.raises(UserError):
        inj.set("launch", None)  # type: ignore[arg-type]
    with pytest.raises(UserError):
        inj.should_fail("gpu")
    with pytest.raises(UserError):
        FaultInjector(seed="x")  # type: ignore[arg-type]
    with pytest.raises(UserError):
        FaultInjector.from_spec(None)  # type: ignore[arg-type]
    with pytest.raises(UserError):
        faults.maybe_fail("gpu")  # even with no injector configured
    with pytest.raises(UserError):
        faults.install("launch:0.1")  # type: ignore[arg-type]


def test_spec_parses_rates_and_modes_and_round_trips() -> None:
    inj = FaultInjector.from_spec(
        " launch:0.05, alloc:0.01 ,compile:ONCE,sync:always,download:never"
    )
    assert inj.modes() == {"launch": 0.05, "alloc": 0.01, "compile": "once", "sync": "always"}
    assert FaultInjector.from_spec(inj.spec()).modes() == inj.modes()
    assert not FaultInjector.from_spec("").enabled
    assert not FaultInjector.from_spec("launch:0").enabled


def test_from_env_reads_spec_and_seed() -> None:
    env = {"WORKBENCH_FAULTS": "launch:0.3", "WORKBENCH_FAULTS_SEED": "42"}
    a, b = FaultInjector.from_env(env), FaultInjector.from_spec("launch:0.3", seed=42)
    assert a.seed == 42 and draws(a, "launch") == draws(b, "launch")
    assert not FaultInjector.from_env({}).enabled
    with pytest.raises(UserError, match="seed"):
        FaultInjector.from_env({"WORKBENCH_FAULTS": "launch:0.3", "WORKBENCH_FAULTS_SEED": "abc"})
    with pytest.raises(UserError, match="malformed"):
        FaultInjector.from_env({"WORKBENCH_FAULTS": "launch=0.3"})


def test_same_seed_same_sequence_other_seed_another() -> None:
    a = draws(FaultInjector.from_spec("launch:0.3", seed=1), "launch")
    b = draws(FaultInjector.from_spec("launch:0.3", seed=1), "launch")
    c = draws(FaultInjector.from_spec("launch:0.3", seed=2), "launch")
    assert a == b and a != c
    assert 30 <= sum(a) <= 90  # about 60 of 200


def test_adding_a_site_does_not_change_another_sites_sequence() -> None:
    alone = FaultInjector.from_spec("launch:0.2", seed=5)
    both = FaultInjector.from_spec("alloc:0.5,launch:0.2", seed=5)
    seq_alone = draws(alone, "launch")
    seq_both = []
    for _ in range(200):  # interleave checks of the other site
        both.should_fail("alloc")
        seq_both.append(both.should_fail("launch"))
    assert seq_alone == seq_both
    # and sites do not share a sequence
    same = FaultInjector.from_spec("alloc:0.5,launch:0.5", seed=5)
    assert draws(same, "alloc") != draws(same, "launch")


def test_once_always_never() -> None:
    inj = FaultInjector.from_spec("compile:once,sync:always")
    assert draws(inj, "compile", 5) == [True, False, False, False, False]
    assert draws(inj, "sync", 5) == [True] * 5
    assert draws(inj, "launch", 5) == [False] * 5
    assert inj.counts() == {"launch": 0, "sync": 5, "alloc": 0, "compile": 1, "download": 0}
    assert inj.checks()["launch"] == 5
    inj.reset_counts()
    assert inj.should_fail("compile") is False  # counts reset, "once" stays spent
    inj.set("compile", "once")  # re-arms
    assert draws(inj, "compile", 3) == [True, False, False]
    assert inj.counts()["compile"] == 1


@pytest.mark.parametrize("site", SITES)
def test_each_site_raises_its_documented_recoverable_error(site: str) -> None:
    inj = FaultInjector.from_spec(f"{site}:always")
    with pytest.raises(RecoverableError) as e:
        inj.maybe_fail(site, kernel="rmsnorm_f32", request_id="r7")
    code, _ = SITE_ERRORS[site]
    assert e.value.code == code
    assert e.value.context["injected"] is True and e.value.context["site"] == site
    assert e.value.context["kernel"] == "rmsnorm_f32" and e.value.context["request_id"] == "r7"
    assert "rmsnorm_f32" in e.value.message and "injected" in e.value.message
    assert inj.injected(site) == 1


def test_site_codes_match_the_issue() -> None:
    assert SITE_ERRORS["launch"][0] == "device.launch_failed"
    assert SITE_ERRORS["sync"][0] == "device.sync_failed"
    assert SITE_ERRORS["alloc"][0] == "device.out_of_memory"
    assert SITE_ERRORS["compile"][0] == "backend.compile_transient"
    assert SITE_ERRORS["download"][0] == "model.download_failed"


def test_process_wide_injector_is_off_until_installed() -> None:
    faults.maybe_fail("launch")  # no injector configured: nothing happens
    assert not faults.default_injector().enabled
    with faults.injecting(FaultInjector.from_spec("launch:always")) as inj:
        with pytest.raises(RecoverableError):
            faults.maybe_fail("launch", kernel="k")
        assert inj.injected("launch") == 1
    faults.maybe_fail("launch")
    assert not faults.default_injector().enabled


def test_retry_stats_account_for_every_injected_fault() -> None:
    inj = FaultInjector.from_spec("launch:0.2", seed=3)
    stats = RetryStats()
    policy = RetryPolicy(max_attempts=4)
    exhausted = 0
    for i in range(500):
        try:
            policy.call(lambda i=i: inj.maybe_fail("launch", step=i), operation="launch",
                        stats=stats, sleep=lambda s: None)  # fmt: skip
        except RecoverableError:
            exhausted += 1
    s = stats.snapshot()["launch"]
    assert inj.injected("launch") == s["failures"] == s["retries"] + s["exhausted"]
    assert s["exhausted"] == exhausted
    assert s["attempts"] == inj.checks()["launch"]
    assert s["failures"] > 50


def test_concurrent_checks_count_every_fault() -> None:
    inj = FaultInjector.from_spec("alloc:0.5", seed=9)
    fails = [0] * 8

    def work(k: int) -> None:
        for _ in range(1000):
            try:
                inj.maybe_fail("alloc")
            except RecoverableError:
                fails[k] += 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert inj.checks()["alloc"] == 8000
    assert inj.injected("alloc") == sum(fails)
    # the draws are the seeded sequence whatever the interleaving
    assert sum(fails) == sum(draws(FaultInjector.from_spec("alloc:0.5", seed=9), "alloc", 8000))
