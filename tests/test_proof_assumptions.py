"""What the certificate assumes is enforced, not hoped for (docs/certification.md §12).

* a setting that changes the float32 arithmetic (oneDNN fpmath mode, torch's fp32_precision
  switches, a disabled oneDNN, flush-to-zero) refuses a certified run with one line naming
  it, and warns for an uncertified one;
* rounding in the subnormal range is covered (a first weight of 2**-149);
* layers are matched by exact type: a subclass with its own forward is refused by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dundi.errors import DundiError
from dundi.nets.arithmetic import ArithmeticWarning, arithmetic_deviations, check_arithmetic
from dundi.nets.bounds import served_layers
from dundi.rule.exact import ExactRule, embed_invariant
from dundi.rule.params import TwoStepRule
from rule_helpers import certifier, resolved

ROOT = Path(__file__).resolve().parents[1]


def test_this_machine_computes_in_the_arithmetic_the_proof_assumes():
    assert arithmetic_deviations() == []


def test_bf16_fpmath_in_the_environment_refuses_a_certified_run_in_one_line():
    """A fresh process with ONEDNN_DEFAULT_FPMATH_MODE=BF16: loading a certified run for
    serving (Run.certifier, what LoadedModel calls) refuses, naming the variable."""
    code = ("from pathlib import Path\n"
            "import numpy as np, torch\n"
            "from dundi.errors import DundiError\n"
            "from dundi.nets.models import build_distance_net\n"
            "from dundi.rule.index import OracleIndex\n"
            "from dundi.run.directory import Run\n"
            "net = build_distance_net('cnn-ibp', (1, 28, 28)).eval()\n"
            "index = OracleIndex(np.random.default_rng(0).standard_normal((20, 128)).astype(np.float32), 2,"
            " metric='sqeuclidean')\n"
            "run = Run(Path('r'), net, {'kind': 'dundi', 'in_shape': [1, 28, 28], 'num_classes': 2}, index)\n"
            "from dundi.rule.params import TwoStepRule\n"
            "try:\n    run.certifier(TwoStepRule(10, 3, 1))\nexcept DundiError as exc:\n    print(exc)\n    raise SystemExit(2)\n")
    env = {**os.environ, "ONEDNN_DEFAULT_FPMATH_MODE": "BF16", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "ONEDNN_DEFAULT_FPMATH_MODE=BF16" in lines[0] and "unset" in lines[0], proc.stdout


@pytest.mark.parametrize("switch", ["mkldnn.conv", "mkldnn.matmul", "mkldnn"])
def test_a_reduced_precision_switch_refuses_a_certified_run(switch):
    module = torch.backends
    for part in switch.split("."):
        module = getattr(module, part)
    if not hasattr(module, "fp32_precision"):
        pytest.skip(f"this torch has no torch.backends.{switch}.fp32_precision")
    before = module.fp32_precision
    module.fp32_precision = "bf16"
    try:
        with pytest.raises(DundiError, match=r"fp32_precision='bf16'.*'ieee'"):
            check_arithmetic(certified=True)
        with pytest.warns(ArithmeticWarning, match=r"fp32_precision='bf16'"):
            assert check_arithmetic(certified=False)
    finally:
        module.fp32_precision = before
    assert arithmetic_deviations() == []


def test_matmul_precision_disabled_onednn_and_flush_to_zero_are_refused():
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.raises(DundiError, match=r"set_float32_matmul_precision\('medium'\)|fp32_precision='bf16'"):
            check_arithmetic(certified=True)
    finally:
        torch.set_float32_matmul_precision("highest")
    with torch.backends.mkldnn.flags(enabled=False):
        with pytest.raises(DundiError, match="mkldnn.enabled=False"):
            check_arithmetic(certified=True)
    torch.set_flush_denormal(True)
    try:
        with pytest.raises(DundiError, match="flush-to-zero.*set_flush_denormal\\(False\\)"):
            check_arithmetic(certified=True)
    finally:
        torch.set_flush_denormal(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_arithmetic(certified=True) == []


def test_a_subnormal_first_weight_does_not_get_a_radius_its_answer_does_not_keep():
    """fl(x·2**-149) is 0 for x < 0.5 and 2**-149 above: amplified by later layers, the served
    label flips at x = 0.5. Interval bounds without an absolute underflow term saw a box of
    width 0 there and certified the image at 0.48 up to radius 1."""
    first = nn.Linear(2, 1, bias=False)
    amp1, amp2, last = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[2.0 ** -149, 0.0]]))
        amp1.weight.fill_(2.0 ** 100)
        amp2.weight.fill_(2.0 ** 49)
        last.weight.fill_(1.0)
    net = nn.Sequential(nn.Flatten(), first, nn.ReLU(), amp1, nn.ReLU(), amp2, nn.ReLU(), last).eval()
    oracles = torch.tensor([[[0.0]], [[1.0]]])
    rule = resolved(oracles, TwoStepRule(1, 1, 1), "sqeuclidean")
    served = lambda px: ExactRule(oracles.numpy(), rule).classify(
        embed_invariant(list(net), np.array([[[[px, 0.0]]]], np.float32))).labels[0]
    assert (served(0.48), served(0.51)) == (0, 1), "the served network does not flip: the test checks nothing"
    radius = certifier(net, oracles, rule).radius(torch.tensor([[[[0.48, 0.0]]]]), torch.tensor([0]))
    assert float(radius[0]) < 0.02, f"radius {float(radius[0])} but the served label flips at 0.51"


class OwnConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class OwnReLU(nn.ReLU):
    def forward(self, x):
        return x


@pytest.mark.parametrize("layer", [OwnConv(1, 2, 3), OwnReLU()], ids=["Conv2d", "ReLU"])
def test_a_subclass_of_a_supported_layer_is_refused_by_name(layer):
    with pytest.raises(DundiError, match=rf"{type(layer).__name__} \(a subclass of {type(layer).__mro__[1].__name__}"):
        served_layers([layer])


@pytest.mark.realdata
def test_the_mean_pixel_gate_holds_for_float64_requests_the_server_rounds_to_float32(certified_run, data_dir):
    """A float64 (JSON) request on the top corner of the ball, x + eps, reaches the model
    rounded to float32, up to half an ulp past the ball. Images are nudged by an ulp so that
    every unclipped pixel of that corner rounds up, and the mean-pixel threshold is put just
    above the float64 corner's mean, where a bound over the float64 box still proves the gate
    closed (computed below): every answer certified with that gate must not abstain on the
    rounded request, whose mean is past the threshold."""
    from dundi.data import load_split
    from dundi.robustness.certificate import AbstainGate
    from dundi.rule.abstain_signals import mean_pixel
    from dundi.rule.exact import U64, fixed_sum, gamma
    from dundi.run.directory import Run

    eps, rule = 0.05, TwoStepRule(None, 3, 5)
    x = load_split("mnist-10k", "test", data_dir, limit=40)[0].copy()
    for _ in range(64):  # move x up an ulp wherever x + eps would round down to float32
        top = np.clip(x.astype(np.float64) + eps, 0, 1)
        down = top.astype(np.float32).astype(np.float64) < top
        x = np.where(down, np.nextafter(x, np.float32(1)), x)
    top = np.clip(x.astype(np.float64) + eps, 0, 1)
    served = top.astype(np.float32)                      # the server's view of the request
    assert (served.astype(np.float64) > top).mean() > 0.5  # most pixels land past the ball
    run = Run.load(certified_run)
    labels = run.classify(x, rule).labels
    certifier = run.certifier(rule)
    kept = 0
    for i in range(len(x)):
        pixels = top[i].size
        threshold = float(mean_pixel(top[i:i + 1])[0]) * (1 + 1e-9)
        float64_box_slack = np.nextafter(threshold, np.inf) - fixed_sum(top[i].reshape(1, -1))[0] / pixels * (
            1 + 4 * gamma(pixels + 2, U64))
        served_mean = float(mean_pixel(served[i:i + 1])[0])
        assert float64_box_slack > 0 and served_mean > threshold   # the trap is set for this image
        gate = AbstainGate(abstain_max_mean=threshold)
        proven = certifier.certified_at(torch.from_numpy(x[i:i + 1]), torch.tensor(labels[i:i + 1]), eps, gate=gate)
        ungated = certifier.certified_at(torch.from_numpy(x[i:i + 1]), torch.tensor(labels[i:i + 1]), eps)
        kept += int(ungated[0])
        assert not bool(proven[0]), f"image {i}: certified, yet the served request abstains on its mean pixel"
    assert kept >= 5  # answers the gate alone keeps from a certificate
