import math

import pytest

from graphtune.errors import ConfigError
from graphtune.config import BudgetConfig, ScoreConfig
from graphtune.transfer.score import StageInputs, budgets_from_config, score_experiment, transfer_auc

W = ScoreConfig()
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
    uniform = score_experiment([_pretrain(), _transfer()], ScoreConfig(alpha=0.0))
    assert [s.difficulty_weight for s in uniform.stages] == [0.5, 0.5]
    squared = score_experiment([_pretrain(), _transfer()], ScoreConfig(alpha=2.0))
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
    assert budgets_from_config(BudgetConfig(mem_mb=512, flops_g=2.0, trainable_m=0.5)) == {
        "mem_mb": 512.0, "flops": 2e9, "trainable_params": 5e5}
    assert budgets_from_config(BudgetConfig()) == {}


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


# ============================================================================ the comparable score
from graphtune.transfer.score import (StageMeasures, comparable_score, cost_references, cost_share,  # noqa: E402
                             skill, skill_auc)

REFS = cost_references(ScoreConfig())  # 10 TFLOPs, 0.1 M, 1 MB, 1 GFLOP: params.yaml's


def _target(**kw) -> StageMeasures:
    args = dict(ref_rmse=10.0, test_rmse=6.0, zero_rmse=8.0, curve=[(0.1, 7.0), (0.3, 6.5), (1.0, 6.0)],
                finetune_flops=1e12, trainable_params=2e4, size_mb=0.1, infer_flops=1e7, difficulty=2.0,
                name="1:target")
    return StageMeasures(**{**args, **kw})


def _score(*stages, **kw) -> float:
    return comparable_score(list(stages), **kw).score


def test_skill_is_strictly_decreasing_bounded_and_zero_at_the_reference():
    assert skill(10.0, 10.0) == 0.0 and skill(0.0, 10.0) == 1.0
    assert skill(5.0, 10.0) == pytest.approx(0.5) and skill(20.0, 10.0) == pytest.approx(-0.5)
    values = [skill(r, 10.0) for r in (0.0, 1.0, 5.0, 9.99, 10.0, 10.01, 20.0, 100.0, 1e6)]
    assert all(a > b for a, b in zip(values, values[1:])) and all(-1 < v <= 1 for v in values)
    assert skill(math.nan, 10.0) == -1.0 and skill(None, 10.0) == -1.0
    with pytest.raises(ValueError, match="reference RMSE"):
        skill(5.0, 0.0)


def test_skill_auc_hand_computed():
    # zero-shot 0.2; 0.3 at 0.1; 0.4 at 0.3, held to 1: 0.025 + 0.07 + 0.28
    assert skill_auc(0.2, [(0.3, 0.4), (0.1, 0.3)]) == pytest.approx(0.375)
    assert skill_auc(0.5, []) == pytest.approx(0.5)  # only the zero-shot point: flat
    assert skill_auc(-0.5, [(1.0, 2.0)]) == pytest.approx(0.5)  # clipped to [0, 1]: (0 + 1) / 2
    assert skill_auc(None, [(0.5, 0.4)]) == pytest.approx(0.1 + 0.2)  # no zero-shot point starts at 0


def test_cost_share_is_half_at_every_reference():
    assert REFS == {"finetune_flops": 10e12, "trainable_params": 1e5, "size_mb": 1.0, "infer_flops": 1e9}
    at_refs = _target(**REFS)
    assert cost_share(at_refs) == pytest.approx(0.5)
    assert cost_share(_target(finetune_flops=0, trainable_params=0, size_mb=0, infer_flops=0)) == 0.0
    doubled = ScoreConfig(ref_finetune_tflops=20.0, ref_trainable_m=0.2, ref_size_mb=2.0, ref_infer_gflops=2.0)
    assert cost_share(at_refs, doubled) == pytest.approx(1 / 3)


def test_hand_computed_stage_score():
    stage = _target()
    part = comparable_score([stage]).stages[0]
    share = (1e12 / 11e12 + 2e4 / 1.2e5 + 0.1 / 1.1 + 1e7 / 1.01e9) / 4
    auc = 0.1 * (0.2 + 0.3) / 2 + 0.2 * (0.3 + 0.35) / 2 + 0.7 * (0.35 + 0.4) / 2
    assert (part.skill, part.zero_skill) == (pytest.approx(0.4), pytest.approx(0.2))
    assert part.transfer_auc == pytest.approx(auc) and part.cost_share == pytest.approx(share)
    assert part.stage_score == pytest.approx(0.45 * 0.4 + 0.35 * auc + 0.20 * 0.4 * (1 - share))


def test_higher_rmse_at_equal_cost_scores_strictly_lower_everywhere():
    rmses = [0.5, 3.0, 6.0, 9.9, 10.0, 10.1, 15.0, 40.0]
    scores = [_score(_target(test_rmse=r, curve=[(0.1, 7.0), (1.0, r)])) for r in rmses]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


@pytest.mark.parametrize("final", [3.0, 9.0, 12.0, 30.0])  # with skill above and below the reference
@pytest.mark.parametrize("key", ["finetune_flops", "trainable_params", "size_mb", "infer_flops"])
def test_higher_cost_at_equal_rmse_scores_strictly_lower(key, final):
    base = _target(test_rmse=final, curve=[(1.0, final)])
    costs = [getattr(base, key) * f for f in (0.01, 1.0, 10.0, 1e3)]
    scores = [_score(_target(test_rmse=final, curve=[(1.0, final)], **{key: c})) for c in costs]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_a_score_depends_on_its_own_run_only():
    # A stage score is a function of its own measurements: scoring it alone or next to any other stage
    # list gives the same parts (difficulty weights only mix the stages of ONE run).
    one = comparable_score([_target()]).stages[0]
    for others in ([_target(test_rmse=1.0)], [_target(test_rmse=50.0, finetune_flops=1e20)]):
        again = comparable_score([_target(), *others]).stages[0]
        assert (again.skill, again.transfer_auc, again.cost_share, again.stage_score) == \
            (one.skill, one.transfer_auc, one.cost_share, one.stage_score)


def test_scratch_never_outscores_a_transfer_with_the_same_curve():
    curve = [(0.1, 9.0), (0.3, 7.0), (1.0, 6.0)]
    transfer = _target(curve=curve, zero_rmse=8.0)
    for random_zero in (0.1, 5.0, 8.0, 1e4):  # whatever a random initialisation happens to score
        scratch = _target(curve=curve, zero_rmse=random_zero, transferred=False)
        assert _score(scratch) <= _score(transfer)
    assert _score(_target(curve=curve, zero_rmse=None, transferred=False)) < _score(transfer)
    # and with a worse final error, strictly below
    assert _score(_target(curve=curve[:2] + [(1.0, 6.5)], test_rmse=6.5, transferred=False)) < _score(transfer)


def test_the_historical_average_scores_zero_and_ranks_below_any_better_model():
    ha = _target(test_rmse=10.0, zero_rmse=10.0, curve=[(1.0, 10.0)], finetune_flops=0, trainable_params=0,
                 size_mb=0, infer_flops=0)
    assert _score(ha) == 0.0
    costly_but_better = _target(test_rmse=9.99, zero_rmse=40.0, curve=[(1.0, 9.99)], finetune_flops=1e20,
                                trainable_params=1e9, size_mb=1e4, infer_flops=1e15)
    assert _score(costly_but_better) > 0.0
    worse_but_free = _target(test_rmse=10.5, zero_rmse=10.5, curve=[(1.0, 10.5)], finetune_flops=0,
                             trainable_params=0, size_mb=0, infer_flops=0)
    assert _score(worse_but_free) < 0.0  # being free does not make a worse forecast better


def test_single_stage_scores_differ_when_errors_differ():
    scores = {r: _score(_target(kind="pretrain", test_rmse=r, zero_rmse=None, curve=[])) for r in (4.0, 5.0, 8.0)}
    assert scores[4.0] > scores[5.0] > scores[8.0]
    # the pretrain stage shares TransferAUC's weight out, as S_uep does
    part = comparable_score([_target(kind="pretrain", zero_rmse=None, curve=[])]).stages[0]
    assert part.transfer_auc == 0.0 and part.stage_score == pytest.approx(
        (0.45 * part.skill + 0.20 * part.eff_term) / 0.65)


def test_the_score_is_unit_free():
    mph = _target()
    kmh = _target(ref_rmse=10.0 * 1.609344, test_rmse=6.0 * 1.609344, zero_rmse=8.0 * 1.609344,
                  curve=[(f, r * 1.609344) for f, r in mph.curve])
    counts = _target(ref_rmse=1000.0, test_rmse=600.0, zero_rmse=800.0, curve=[(f, r * 100) for f, r in mph.curve])
    assert _score(kmh) == pytest.approx(_score(mph)) and _score(counts) == pytest.approx(_score(mph))


def test_budget_penalty_uses_the_measured_usage():
    part = comparable_score([_target(usage={"mem_mb": 300.0, "time_s": 10.0})], budgets={"mem_mb": 200.0}).stages[0]
    assert part.budget_penalty == pytest.approx(0.5)
    free = comparable_score([_target(usage={"mem_mb": 300.0})]).stages[0]
    assert part.stage_score == pytest.approx(free.stage_score - 0.25 * 0.5)


def test_difficulty_weights_mix_the_stages_of_one_run():
    easy, hard = _target(difficulty=1.0, test_rmse=5.0), _target(difficulty=3.0, test_rmse=8.0)
    result = comparable_score([easy, hard])
    assert [s.difficulty_weight for s in result.stages] == pytest.approx([0.25, 0.75])
    assert result.score == pytest.approx(0.25 * result.stages[0].stage_score + 0.75 * result.stages[1].stage_score)


def test_bad_references():
    from graphtune.config import validate_section

    with pytest.raises(ConfigError, match=r"^score\.ref_finetune_tflops: expected a finite number > 0, got 0\.0$"):
        validate_section("score", ScoreConfig(ref_finetune_tflops=0.0))
    with pytest.raises(ValueError, match="stage kind"):
        comparable_score([_target(kind="magic")])
