"""device.py: the measured precision rule, its per-machine cache, and the CUDA rules (on mocks)."""

from __future__ import annotations

import json

import pytest
import torch

from diffuse import device as D

# Rates (GFLOP/s) of the kind the probe measures. AVX512-BF16 without AMX: the Xeon, bf16
# slower on both ops, the small UNet's fp32 step faster in channels_last (1.25x; steps/s); AMX-like:
# bf16 several times faster, the layouts a tie.
SLOW_BF16 = {"matmul_fp32": 125.0, "matmul_bf16": 69.0, "conv_fp32": 91.0, "conv_bf16": 60.0,
             "unet_nchw": 40.0, "unet_nhwc": 50.0, "spread": 1.05}
FAST_BF16 = {"matmul_fp32": 200.0, "matmul_bf16": 800.0, "conv_fp32": 250.0, "conv_bf16": 500.0,
             "unet_nchw": 60.0, "unet_nhwc": 61.0, "spread": 1.05}
RATE_KEYS = ("matmul_fp32", "matmul_bf16", "conv_fp32", "conv_bf16", "unet_nchw", "unet_nhwc")


def _result(rates):
    return D.ProbeResult(**{k: rates[k] for k in RATE_KEYS if k in rates})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path))
    monkeypatch.setattr(D, "_busy", lambda *_: False)
    return tmp_path / "device" / "bf16-probe.json"


class Timer:
    def __init__(self, rates):
        self.rates, self.calls = rates, 0

    def __call__(self):
        self.calls += 1
        return dict(self.rates)


def test_decision_from_given_timings():
    assert not D.bf16_wins(_result(SLOW_BF16))
    assert D.bf16_wins(_result(FAST_BF16))
    r = _result(FAST_BF16)
    assert r.speedup == pytest.approx((4.0 * 2.0) ** 0.5)
    # a tie (within timing noise) keeps fp32: 1.05x on both ops is under the 1.10x margin
    tie = _result({"matmul_fp32": 100.0, "matmul_bf16": 105.0, "conv_fp32": 100.0, "conv_bf16": 105.0})
    assert not D.bf16_wins(tie)
    # one op faster, the other slower: the geometric mean decides (2.0 * 0.5 -> 1.0: fp32)
    mixed = _result({"matmul_fp32": 100.0, "matmul_bf16": 200.0, "conv_fp32": 100.0, "conv_bf16": 50.0})
    assert mixed.speedup == pytest.approx(1.0) and not D.bf16_wins(mixed)


def test_auto_on_cpu_follows_the_probe_and_amx(cache, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(D, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(D, "_time_ops", Timer(SLOW_BF16))
    c = D.choose_precision("auto", cpu)
    assert c.dtype is None and c.probe is not None and "0.6" in c.reason
    assert D.use_channels_last(None, cpu, c.dtype)          # fp32, but its UNet step is 1.25x faster in NHWC
    # AMX: bf16 without probing
    monkeypatch.setattr(D, "cpu_has_amx", lambda: True)
    boom = Timer(SLOW_BF16)
    monkeypatch.setattr(D, "_time_ops", boom)
    c = D.choose_precision("auto", cpu)
    assert c.dtype is torch.bfloat16 and c.reason == "CPU has AMX" and boom.calls == 0
    assert D.use_channels_last(None, cpu, c.dtype)
    # explicit choices are never overridden
    assert D.autocast_dtype("fp32", cpu) is None and D.autocast_dtype("bf16", cpu) is torch.bfloat16


def test_probe_cache_hit_miss_and_key(cache, monkeypatch):
    timer = Timer(FAST_BF16)
    a = D.probe_bf16(timer=timer)
    b = D.probe_bf16(timer=timer)
    assert timer.calls == 1 and (a.matmul_bf16, a.conv_fp32) == (b.matmul_bf16, b.conv_fp32)
    entries = json.loads(cache.read_text())["entries"]
    assert list(entries) == [D.probe_key()] and "torch " + torch.__version__ in D.probe_key()
    # another thread count is another machine as far as the probe is concerned
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert "7 threads" in D.probe_key()
    D.probe_bf16(timer=timer)
    assert timer.calls == 2 and len(json.loads(cache.read_text())["entries"]) == 2
    # refresh measures again
    D.probe_bf16(timer=timer, refresh=True)
    assert timer.calls == 3


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"version": 99, "entries": {}}),
                                     "KEY"])
def test_corrupt_cache_is_measured_over(cache, content):
    cache.parent.mkdir(parents=True)
    if content == "KEY":                         # the right key, a damaged entry
        content = json.dumps({"version": D.PROBE_VERSION, "entries": {D.probe_key(): {"matmul_fp32": "x"}}})
    cache.write_text(content)
    timer = Timer(SLOW_BF16)
    r = D.probe_bf16(timer=timer)
    assert timer.calls == 1 and r.matmul_bf16 == 69.0
    assert json.loads(cache.read_text())["entries"][D.probe_key()]["conv_bf16"] == 60.0
    D.probe_bf16(timer=timer)
    assert timer.calls == 1


GOOD_ENTRY = {**{k: SLOW_BF16[k] for k in RATE_KEYS},
              "seconds": 0.5, "spread": 1.05}
BAD_ENTRIES = {"rate 0": {**GOOD_ENTRY, "matmul_fp32": 0}, "negative": {**GOOD_ENTRY, "conv_bf16": -60.0},
               "NaN as a string": {**GOOD_ENTRY, "conv_fp32": "NaN"}, "NaN": {**GOOD_ENTRY, "conv_fp32": float("nan")},
               "inf as a string": {**GOOD_ENTRY, "matmul_bf16": "inf"}, "a number as a string": {**GOOD_ENTRY, "matmul_bf16": "69"},
               "missing key": {k: v for k, v in GOOD_ENTRY.items() if k != "conv_fp32"},
               "wrong type": {**GOOD_ENTRY, "matmul_fp32": [125.0]}, "a bool": {**GOOD_ENTRY, "matmul_fp32": True},
               "negative spread": {**GOOD_ENTRY, "spread": -1.0}, "entry a list": list(GOOD_ENTRY.values())}


@pytest.mark.parametrize("entry", BAD_ENTRIES, ids=list(BAD_ENTRIES))
def test_hand_edited_cache_entry_is_measured_over_and_replaced(cache, monkeypatch, entry):
    """A cached entry is checked like a fresh measurement: a rate of 0 once raised ZeroDivisionError and
    a negative one 'math domain error' in choose_precision('auto'), stopping every command."""
    monkeypatch.setattr(D, "cpu_has_amx", lambda: False)
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"version": D.PROBE_VERSION, "entries": {D.probe_key(): BAD_ENTRIES[entry]}}))
    timer = Timer(SLOW_BF16)
    monkeypatch.setattr(D, "_time_ops", timer)
    c = D.choose_precision("auto", torch.device("cpu"))
    assert c.dtype is None and timer.calls == 1 and c.probe.matmul_fp32 == 125.0
    stored = json.loads(cache.read_text())["entries"][D.probe_key()]
    assert {k: stored[k] for k in RATE_KEYS} == {k: SLOW_BF16[k] for k in RATE_KEYS}
    D.choose_precision("auto", torch.device("cpu"))
    assert timer.calls == 1                                     # the replaced entry is used


@pytest.mark.parametrize("content", ["{not json", json.dumps([GOOD_ENTRY]), json.dumps({"version": D.PROBE_VERSION,
                                                                                           "entries": [GOOD_ENTRY]})])
def test_hand_edited_cache_file_is_measured_over(cache, monkeypatch, content):
    monkeypatch.setattr(D, "cpu_has_amx", lambda: False)
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    timer = Timer(SLOW_BF16)
    monkeypatch.setattr(D, "_time_ops", timer)
    assert D.choose_precision("auto", torch.device("cpu")).dtype is None and timer.calls == 1
    assert json.loads(cache.read_text())["entries"][D.probe_key()]["conv_bf16"] == 60.0


def test_a_good_cache_entry_is_used_as_written(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"version": D.PROBE_VERSION, "entries": {D.probe_key(): {**GOOD_ENTRY, "matmul_fp32": 7}}}))
    timer = Timer(FAST_BF16)
    r = D.probe_bf16(timer=timer)
    assert timer.calls == 0 and r.matmul_fp32 == 7.0 and r.seconds == 0.5


def test_noisy_probe_is_not_cached(cache, monkeypatch):
    timer = Timer({**FAST_BF16, "spread": 3.0})
    D.probe_bf16(timer=timer)
    D.probe_bf16(timer=timer)
    assert timer.calls == 2 and not cache.exists()
    monkeypatch.setattr(D, "_busy", lambda *_: True)              # a quiet probe on a busy machine: same
    timer = Timer(FAST_BF16)
    D.probe_bf16(timer=timer)
    assert not cache.exists()


def test_real_probe_runs_and_gives_positive_rates(cache):
    r = D.probe_bf16()
    assert all(getattr(r, k) > 0 for k in RATE_KEYS) and r.seconds < 10


@pytest.mark.parametrize("noisy", [False, True])
def test_probe_skips_the_unet_step_when_the_first_ops_ran_under_load(monkeypatch, noisy):
    # spread > NOISY_SPREAD after the matmul and conv: the layout is left at a tie (NCHW), unmeasured
    from diffuse.models import UNet
    calls = []
    real = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    monkeypatch.setattr(D, "NOISY_SPREAD", 0.5 if noisy else 1e9)     # every spread is >= 1
    rates = D._time_ops(repeats=2)
    if noisy:
        assert calls == [] and rates["unet_nchw"] == rates["unet_nhwc"]
        assert D.ProbeResult(**{k: rates[k] for k in RATE_KEYS}).nhwc_speedup < D.NHWC_MIN_SPEEDUP
    else:
        assert len(calls) == 2 * (1 + 2) and rates["unet_nchw"] > 0 and rates["unet_nhwc"] > 0


@pytest.mark.parametrize("nchw, nhwc, expect", [(40.0, 50.0, True), (40.0, 42.0, True), (40.0, 41.9, False),
                                                (50.0, 40.0, False)])
def test_fp32_layout_on_cpu_follows_the_probed_unet_step(cache, monkeypatch, nchw, nhwc, expect):
    cpu = torch.device("cpu")
    monkeypatch.setattr(D, "_time_ops", Timer({**SLOW_BF16, "unet_nchw": nchw, "unet_nhwc": nhwc}))
    assert D.use_channels_last(None, cpu, None) is expect            # 1.05x needed: 42 / 40 = 1.05
    chosen, reason = D.choose_layout(None, cpu, None)
    assert chosen is expect
    assert reason.startswith(f"layout {'channels_last' if expect else 'NCHW'}: a small UNet's fp32 step measured "
                             f"{nhwc / nchw:.2f}x") and "needs 1.05x" in reason
    # bf16 is channels_last whatever the UNet step says, a setting wins; neither gives a CPU reason
    assert D.choose_layout(None, cpu, torch.bfloat16) == (True, "")
    assert D.choose_layout(not expect, cpu, None) == (not expect, "")


@pytest.mark.parametrize("capability, native, expect", [((7, 5), False, None), ((8, 0), True, torch.bfloat16),
                                                          ((8, 6), False, None)])
def test_auto_on_cuda_needs_native_bf16(monkeypatch, capability, native, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    cuda = torch.device("cuda")
    assert D.autocast_dtype("auto", cuda) is expect
    assert D.use_channels_last(None, cuda, None)                 # cuDNN's NHWC kernels, any precision
    # sampling on CUDA defaults to the run's training precision
    assert D.sampling_precision("auto", cuda, "bf16").dtype is torch.bfloat16
    assert D.sampling_precision("auto", cuda, "fp32").dtype is None
    assert D.sampling_precision("auto", cuda, "auto").dtype is expect
    assert D.sampling_precision("fp32", cuda, "bf16").dtype is None


def test_sampling_precision_on_cpu_is_the_measured_rule(cache, monkeypatch):
    monkeypatch.setattr(D, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(D, "_time_ops", Timer(SLOW_BF16))
    assert D.sampling_precision("auto", torch.device("cpu"), "bf16").dtype is None


def test_info_cli_shows_choice_and_rates(cache, monkeypatch, capsys):
    from diffuse.cli import main
    monkeypatch.setattr(D, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(D, "_time_ops", Timer(SLOW_BF16))
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "auto choice  cpu fp32 channels_last" in out and "fp32 125, bf16 69 GFLOP/s" in out
    assert "fp32 UNet step (0.29M, batch 32): NCHW 40.0, NHWC 50.0 steps/s" in out
    assert main(["info", "--device", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["precision"] == "fp32" and d["probe"]["conv_bf16"] == 60.0


def test_info_measures_an_uncacheable_probe_once(cache, monkeypatch, capsys):
    # On a busy machine nothing is cached, so each read measures again (seconds, and the two reads
    # could disagree with each other); `diffuse info` reads it once for the precision and the layout.
    from diffuse.cli import main
    monkeypatch.setattr(D, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(D, "_busy", lambda *_: True)
    for argv in (["info", "--device", "cpu"], ["info", "--device", "cpu", "--json"]):
        timer = Timer(SLOW_BF16)
        monkeypatch.setattr(D, "_time_ops", timer)
        assert main(argv) == 0
        capsys.readouterr()
        assert timer.calls == 1 and not cache.exists()
