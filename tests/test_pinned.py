"""Today's strategies pinned on the real sample: a refactor of the core must not move a single metric.

The numbers were measured before the strategy interface moved (issue 9), with 1 epoch per stage on every
4th training window, seed 0, west -> east, curve (0.3, 1.0) run in full. Tolerance 1e-4 relative: CPUs with
other vector units round float32 differently; a change of protocol (another window, another seed order,
another scaler) moves these numbers by percent, not by 1e-4.

Changed on purpose once since (issue 10): `fit` makes the starting weights a candidate for the best state.
Only dcrnn moved: its one teacher-forced pretraining epoch is worse on (free-running) validation than its
initialisation, so the pretrained source and everything after it changed.
"""

from __future__ import annotations

import pytest

from graphtune.config import ExperimentConfig, PrepareConfig, TrainConfig, TransferConfig
from graphtune.data.prepare import prepare_dataset
from graphtune.transfer.stages import run_experiment

CASES = {"baseline": {}, "hypernet": {}, "dcrnn": {"hidden": 8},
         "gwnet": {"residual_channels": 4, "dilation_channels": 4, "skip_channels": 8, "end_channels": 8}}
# model/strategy: (zero-shot test RMSE, test RMSE at 0.3 and 1.0, final test MAE, trainable parameters)
PINNED = {
    "baseline/full": (12.344477657566681, [12.198548004699498, 11.919857571521396], 7.955471324663252, 4300),
    "baseline/freeze-transferred": (12.344477657566681, [12.338439262513374, 12.348419949627248], 8.292651432784785, 0),
    "baseline/scratch": (None, [13.378468266427552, 13.059838055575574], 8.898655609016316, 4300),
    "hypernet/full": (11.751020522981051, [11.1630084774982, 10.317171116039292], 6.153903247092256, 23832),
    "hypernet/freeze-transferred": (11.751020522981051, [11.614062390453647, 11.63203434180161], 7.044955696384756, 0),
    "hypernet/scratch": (None, [13.126423433800642, 12.642534394759066], 7.988839996963056, 23832),
    "dcrnn/full": (14.590287988148917, [14.412012044257732, 14.331345968602392], 8.563922744892869, 2337),
    "dcrnn/freeze-transferred": (14.590287988148917, [14.467270782263606, 14.501419785815548], 8.727486449270918, 0),
    "dcrnn/scratch": (None, [14.458736038707231, 14.48178913952787], 8.660227563072313, 2337),
    "gwnet/full": (13.041446401854184, [12.99676480112467, 12.9965750558711], 8.934020957700637, 4040),
    "gwnet/freeze-transferred": (13.041446401854184, [13.00005596999275, 13.006635019373034], 8.963394323928474, 2080),
    "gwnet/scratch": (None, [13.086571607678563, 13.08474219925275], 9.033012123765895, 4040),
}


@pytest.fixture(scope="module")
def cities(repo_root):
    return [prepare_dataset(c, PrepareConfig(stride=4), root=repo_root, use_processed=False) for c in ("metr-la-west", "metr-la-east")]


@pytest.mark.parametrize("case", sorted(PINNED))
def test_strategies_keep_their_metrics(cities, case):
    model, strategy = case.split("/")
    result = run_experiment(cities, ExperimentConfig(model=model, model_kwargs=CASES[model], strategy=strategy),
                            TrainConfig(epochs=[1], lrs=[0.003, 0.001], batch_size=128),
                            TransferConfig(fractions=[0.3, 1.0], min_gain_rate=-1e9, min_rel_improve=-1e9))
    target = result.stages[-1]
    zero, curve, mae, trainable = PINNED[case]
    assert target.zero_rmse == (None if zero is None else pytest.approx(zero, rel=1e-4))
    assert [p["test_rmse"] for p in target.curve] == pytest.approx(curve, rel=1e-4)
    assert target.test["mae"] == pytest.approx(mae, rel=1e-4)
    assert target.static_eff["params_trainable"] == trainable
