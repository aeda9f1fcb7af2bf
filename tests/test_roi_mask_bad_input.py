"""Every bad input of lxmert_fast::roi_feature_mask(_) raises a Python exception, never kills the process.

On a GPU machine (torch 2.11 + cu130) a 2-D input segfaulted where this machine raises ValueError
(issue #10), so each case runs in a child process, in two modes:

* ``load_library``: ``torch.ops.load_library`` of the built ``lxmert_fast._C`` and nothing else
  of the package, on CPU tensors — the extension alone against torch;
* ``package``: after ``import lxmert_fast`` and its wrapper, with CUDA initialised where there is
  a device, on CPU and (when the CUDA kernel is built) CUDA tensors — as training meets the op.

The child runs all cases of a mode and prints a line before each call, so a death names the case,
op and device it was running; that case's test fails with the signal and stderr, and the child is
started again on the cases after it. The child asserts the exception type and that the message
starts with the argument's name and says what it found (the texts of ``check_roi_mask_args``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
from typing import Any

import pytest

# The package mode initialises CUDA and uses CUDA tensors where present:
# benchmarks/gpu_check.sh runs this file on the card.
pytestmark = pytest.mark.cuda

LOAD_LIBRARY, PACKAGE, PROBE = "load_library", "package", "probe"
VARIANTS = ("roi_feature_mask", "roi_feature_mask_")
CHILD_TIMEOUT_S = 300
EXIT = "(exit)"


@dataclasses.dataclass(frozen=True)
class Case:
    error: type[Exception]
    message: str  # regex matched at the start of str(exception)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # keyword arguments besides seed=1
    shape: tuple[int, ...] = (2, 3, 4)  # of zeros(shape, dtype), transposed(1, 2) when `transposed`
    dtype: str = "float32"
    transposed: bool = False
    wrapper: bool = False  # through lxmert_fast.roi_mask's Python wrappers (package mode only)


PROBABILITY = r": expected a probability in \[0, 1\], got "
RANK = r"features: expected a 3-D tensor \[B, N, D\], got shape "
DTYPES = r"features: expected dtype float32, float16, bfloat16 or float64, got "
SEED = r"seed: expected a 64-bit value in \[-2\*\*63, 2\*\*64\), got "
CASES = {
    "rank_2d": Case(ValueError, RANK + r"\[4, 5\]", shape=(4, 5)),
    "rank_4d": Case(ValueError, RANK + r"\[2, 3, 4, 5\]", shape=(2, 3, 4, 5)),
    "dtype_int32": Case(TypeError, DTYPES + "Int", dtype="int32"),
    "dtype_int64": Case(TypeError, DTYPES + "Long", dtype="int64"),
    "non_contiguous": Case(
        ValueError,
        r"features: expected a contiguous tensor \(call \.contiguous\(\)\), got shape \[4, 5, 6\] "
        r"with strides \[30, 1, 5\]",
        shape=(4, 6, 5),
        transposed=True,
    ),
    "p_select_negative": Case(ValueError, "p_select" + PROBABILITY + "-0.1", {"p_select": -0.1}),
    "p_zero_above_one": Case(ValueError, "p_zero" + PROBABILITY + "1.5", {"p_zero": 1.5}),
    "p_replace_nan": Case(ValueError, "p_replace" + PROBABILITY + "nan", {"p_replace": math.nan}),
    "p_zero_plus_p_replace": Case(
        ValueError,
        r"p_zero \+ p_replace: expected at most 1, got 0\.8 \+ 0\.3",
        {"p_zero": 0.8, "p_replace": 0.3},
    ),
    "offset_negative": Case(
        ValueError, "offset: expected a non-negative Philox counter, got -1", {"offset": -1}
    ),
    "seed_above_64_bits": Case(ValueError, SEED + str(2**64), {"seed": 2**64}, wrapper=True),
    "seed_below_64_bits": Case(ValueError, SEED + str(-(2**63) - 1), {"seed": -(2**63) - 1}, wrapper=True),
}


# --- child process -------------------------------------------------------------------------------


def _run_case(case: Case, name: str, devices: list[str], ops: Any) -> str | None:
    """None when every variant on every device raised as expected, else what happened instead."""
    import torch

    for variant in VARIANTS:
        for device in devices:
            print(f"start {name} {variant} {device}", flush=True)
            features = torch.zeros(case.shape, dtype=getattr(torch, case.dtype), device=device)
            if case.transposed:
                features = features.transpose(1, 2)
            try:
                getattr(ops, variant)(features, **{"seed": 1, **case.overrides})
            except Exception as exc:
                if type(exc) is not case.error or not re.match(case.message, str(exc)):
                    return (
                        f"{variant} on {device}: expected {case.error.__name__} matching {case.message!r}, "
                        f"got {type(exc).__name__}: {exc}"
                    )
            else:
                return f"{variant} on {device}: no exception"
    return None


def _child(mode: str, library: str, names: list[str]) -> None:
    if mode == PROBE:
        # Exercises the parent's crash handling without torch: "crash" dies like the segfault.
        for name in names:
            print(f"start {name} - -", flush=True)
            if name == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            print(f"done {name} {json.dumps(None)}", flush=True)
        return

    import torch

    devices, wrappers = ["cpu"], None
    if mode == LOAD_LIBRARY:
        torch.ops.load_library(library)
    else:
        import lxmert_fast  # noqa: F401  (the package as training imports it, before the op)
        from lxmert_fast import roi_mask as wrappers

        if torch.cuda.is_available():
            torch.cuda.init()
            if torch._C._dispatch_has_kernel_for_dispatch_key(wrappers.OP, "CUDA"):
                devices.append("cuda")
    for name in names:
        case = CASES[name]
        failure = _run_case(case, name, devices, wrappers if case.wrapper else torch.ops.lxmert_fast)
        print(f"done {name} {json.dumps(failure)}", flush=True)


# --- parent (the tests) --------------------------------------------------------------------------


def _death(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _collect(mode: str, library: str, names: list[str]) -> dict[str, str | None]:
    """Run the child until every case has a result: None (passed) or the failure. A child that dies
    inside a case fails that case and is started again on the rest; a death after the last case is
    reported under EXIT."""
    results: dict[str, str | None] = {}
    pending = list(names)
    while pending:
        command = [sys.executable, os.path.abspath(__file__), mode, library, *pending]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
            stdout, stderr, death = proc.stdout, proc.stderr, _death(proc.returncode)
            clean = proc.returncode == 0
        except subprocess.TimeoutExpired as exc:
            # Documented: the captured output is bytes here even with text=True.
            stdout = (exc.stdout or b"").decode(errors="replace")
            stderr = (exc.stderr or b"").decode(errors="replace")
            death, clean = f"timed out after {CHILD_TIMEOUT_S} s", False
        running = None
        for line in stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "start":
                running = rest
            elif kind == "done":
                name, _, failure = rest.partition(" ")
                results[name], running = json.loads(failure), None
        pending = [name for name in pending if name not in results]
        if clean and not pending:
            break
        died, report = f"{mode} child {death}", f"; its stderr:\n{stderr[-4000:]}"
        if running is not None:
            results[running.split()[0]] = f"{died} while running {running}{report}"
        elif not pending:
            results[EXIT] = f"{died} after its last case{report}"
        else:  # died at start-up or between cases: none of the pending cases ran
            results.update(dict.fromkeys(pending, f"{died} before this case ran{report}"))
        pending = [name for name in pending if name not in results]
    return results


@functools.cache
def _library() -> str | None:
    spec = importlib.util.find_spec("lxmert_fast._C")
    return None if spec is None else spec.origin


@functools.cache
def _results(mode: str) -> dict[str, str | None]:
    names = [name for name, case in CASES.items() if mode == PACKAGE or not case.wrapper]
    return _collect(mode, _library() or "", names)


def _skip_unless_runnable(mode: str) -> None:
    if mode == LOAD_LIBRARY and _library() is None:
        pytest.skip("lxmert_fast._C is not built (pip install --no-build-isolation -e .): nothing to load")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", [LOAD_LIBRARY, PACKAGE])
def test_bad_input_raises_in_child_process(mode, case) -> None:
    if mode == LOAD_LIBRARY and CASES[case].wrapper:
        pytest.skip(
            "the seed range is checked by the Python wrapper, which load_library mode does not import"
        )
    _skip_unless_runnable(mode)
    failure = _results(mode)[case]
    if failure is not None:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("mode", [LOAD_LIBRARY, PACKAGE])
def test_child_process_exits_cleanly(mode) -> None:
    _skip_unless_runnable(mode)
    failure = _results(mode).get(EXIT)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_a_child_that_dies_fails_only_its_case() -> None:
    results = _collect(PROBE, "", ["before", "crash", "after"])
    assert results["before"] is None and results["after"] is None, results
    assert "killed by SIGSEGV while running crash" in results["crash"], results["crash"]
    assert EXIT not in results


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3:])
