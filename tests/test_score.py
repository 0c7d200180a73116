import math

import pytest

from graphtune.errors import ConfigError
from graphtune.score import ScoreWeights, StageInputs, budgets_from_config, score_experiment, transfer_auc

W = ScoreWeights()
RENORM = (W.w_perf + W.w_transfer_auc + W.w_eff) / (W.w_perf + W.w_eff)  # 1.0 / 0.65 with the defaults


def _pretrain(**kw):
    args = dict(test_rmse=5.0, mem_mb=200.0, time_s=100.0, flops=2e9, trainable_params=1e6, difficulty=1.0,
                name="pretrain")
    return StageInputs(**{**args, **kw})


def _transfer(**kw):
    args = dict(test_rmse=4.0, zero_rmse=8.0, curve=[(0.5, 6.0), (1.0, 4.0)], mem_mb=100.0, time_s=50.0,
                flops=2e9, trainable_params=1e6, difficulty=3.0, name="transfer")
    return StageInputs(**{**args, **kw})


def test_defaults():
    assert (W.w_perf, W.w_transfer_auc, W.w_eff, W.w_budget, W.alpha) == (0.45, 0.35, 0.20, 0.25, 1.0)


def test_transfer_auc_hand_computed():
    curve = [(0.3, 6.0), (1.0, 5.0), (0.1, 8.0)]  # unsorted on purpose; r = 0.2, 0.4, 0.5
    # trapezoids: 0.1 * 0.1 + 0.2 * 0.3 + 0.7 * 0.45 = 0.385 over the range [0, 1]
    assert transfer_auc(10.0, curve) == pytest.approx(0.385)
    # a curve stopped at 0.3 is normalised by its own range: (0.01 + 0.06) / 0.3
    assert transfer_auc(10.0, [(0.1, 8.0), (0.3, 6.0)]) == pytest.approx(0.07 / 0.3)
    assert transfer_auc(10.0, [(0.5, 12.0)]) == 0.0  # worse than zero-shot: clipped to 0
    assert transfer_auc(10.0, [(1.0, -5.0)]) == pytest.approx(0.5)  # improvement clipped to 1
    assert transfer_auc(None, curve) == 0.0 and transfer_auc(10.0, []) == 0.0
    assert transfer_auc(10.0, [(0.0, 10.0), (1.0, 5.0)]) == pytest.approx(0.25)  # the fraction-0 point is the start


def test_single_stage_run():
    result = score_experiment([_pretrain()])
    (stage,) = result.stages
    assert (stage.perf_norm, stage.transfer_auc, stage.eff_norm, stage.budget_penalty) == (1.0, 0.0, 0.0, 0.0)
    assert stage.difficulty_weight == 1.0
    # no zero-shot: TransferAUC's weight is shared out, so 0.45 * 1 scaled by 1 / 0.65
    assert stage.stage_score == pytest.approx(0.45 * RENORM) == pytest.approx(0.45 / 0.65)
    assert result.s_uep == pytest.approx(0.45 / 0.65)


def test_two_stages_with_difficulty_weights():
    result = score_experiment([_pretrain(), _transfer()])
    pre, tra = result.stages
    assert (pre.perf_norm, tra.perf_norm) == (pytest.approx(0.8), 1.0)  # best RMSE 4 / 5
    assert tra.transfer_auc == pytest.approx(0.25)  # r = 0.25 at 0.5, 0.5 at 1.0
    assert pre.eff_norm == pytest.approx(0.0)  # the maximum of every usage
    assert tra.eff_norm == pytest.approx(1 - (0.5 + 0.5 + 1 + 1) / 4)
    assert pre.stage_score == pytest.approx(0.45 * 0.8 / 0.65)
    assert tra.stage_score == pytest.approx(0.45 + 0.35 * 0.25 + 0.20 * 0.25)
    assert (pre.difficulty_weight, tra.difficulty_weight) == (pytest.approx(0.25), pytest.approx(0.75))
    assert result.s_uep == pytest.approx(0.25 * 0.45 * 0.8 / 0.65 + 0.75 * 0.5875)
    uniform = score_experiment([_pretrain(), _transfer()], ScoreWeights(alpha=0.0))
    assert [s.difficulty_weight for s in uniform.stages] == [0.5, 0.5]
    squared = score_experiment([_pretrain(), _transfer()], ScoreWeights(alpha=2.0))
    assert [s.difficulty_weight for s in squared.stages] == pytest.approx([0.1, 0.9])


def test_budgets_exceeded_are_penalised():
    result = score_experiment([_pretrain(), _transfer()], budgets={"mem_mb": 150.0, "time_s": 200.0})
    pre, tra = result.stages
    # pretrain: mem 200/150 -> share 1 (clipped), overrun 1/3; time 100/200 = 0.5; FLOPs and params at the maximum
    assert pre.eff_norm == pytest.approx(1 - (1 + 0.5 + 1 + 1) / 4)
    assert pre.budget_penalty == pytest.approx((200 / 150 - 1 + 0.0) / 2)
    assert pre.stage_score == pytest.approx((0.45 * 0.8 + 0.20 * 0.125) / 0.65 - 0.25 * (1 / 6))
    # transfer: within both budgets
    assert tra.eff_norm == pytest.approx(1 - (100 / 150 + 50 / 200 + 1 + 1) / 4)
    assert tra.budget_penalty == 0.0
    assert result.s_uep == pytest.approx(0.25 * pre.stage_score + 0.75 * tra.stage_score)


def test_budgets_from_config_converts_units():
    assert budgets_from_config(budget_mem_mb=512, budget_flops_g=2.0, budget_trainable_m=0.5) == {
        "mem_mb": 512.0, "flops": 2e9, "trainable_params": 5e5}
    assert budgets_from_config() == {}


def test_missing_usage_is_left_out_of_the_mean():
    stages = [_pretrain(mem_mb=None), _transfer()]
    pre = score_experiment(stages).stages[0]
    assert pre.eff_norm == pytest.approx(1 - (1 + 1 + 1) / 3)
    bare = StageInputs(test_rmse=3.0, zero_rmse=6.0, curve=[(1.0, 3.0)])
    assert score_experiment([bare]).stages[0].eff_norm == 0.0  # nothing measured, no credit


def test_nan_results_score_zero_parts():
    result = score_experiment([_pretrain(test_rmse=math.nan), _transfer(zero_rmse=math.nan)])
    assert result.stages[0].perf_norm == 0.0
    assert result.stages[1].transfer_auc == 0.0  # NaN zero-shot counts as missing


def test_bad_inputs():
    with pytest.raises(ConfigError, match="budgets: unknown"):
        score_experiment([_pretrain()], budgets={"memory": 1.0})
    with pytest.raises(ConfigError, match="must be > 0"):
        score_experiment([_pretrain()], budgets={"time_s": 0.0})
    with pytest.raises(ValueError, match="difficulties"):
        score_experiment([_pretrain(difficulty=-1.0)])
    with pytest.raises(ValueError, match="at least one stage"):
        score_experiment([])


def test_to_dict_is_flat_enough_for_json():
    d = score_experiment([_pretrain(), _transfer()]).to_dict()
    assert set(d) == {"s_uep", "stages"}
    assert set(d["stages"][1]) == {"name", "perf_norm", "transfer_auc", "eff_norm", "budget_penalty",
                                   "stage_score", "difficulty_weight"}
