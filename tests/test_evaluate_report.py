"""What evaluate.py reports, without running a model: the unparsed verdicts beside every win rate and no rate from no
verdicts, the caveat of a negative KL estimate, the plots of such runs, and where render_hh_with_chat_template comes
from (evaluate.yaml, else the run's config.yaml, else the training_options.json its hf_model/ carries)."""
import json

import pytest

from checkpoints import TRAINING_OPTIONS_FILE
from eval_helpers import eval_config
from evaluate import dataset_options, describe, describe_kl, pairwise_summary, plot_results, validate_config
from generation import load_model, trained_chat_rendering
from helpers import FAST, start_run
from judges import comparison


def test_no_verdicts_is_no_win_rate():
    """4 pairs whose 8 verdicts are all unreadable: each pair scores ½ (judges.comparison), but that is no win rate of
    0.500 [0.500, 0.500] (what evaluate.py printed before): win_rate and ci95 are None, and the line says why."""
    summary = pairwise_summary([comparison(None, None)] * 4)
    assert summary == {'win_rate': None, 'ci95': None, 'n': 4, 'unparsed_verdicts': 8}
    assert describe({**summary, 'temperature': 1.0}) == ('T=1: no verdicts (all 8 verdicts of 4 pairs unparsed): '
                                                          'no win rate')


def test_the_unparsed_count_is_printed_beside_the_win_rate():
    """Pairs (A, B) = 1, (A, None) = ¾, (None, None) = ½, (B, A) = 0: mean 0.5625, s = 0.426956, s/√4 = 0.213478,
    95% interval 0.5625 ± 0.418409 = [0.144091, 0.980909]; 3 of the 8 verdicts unparsed."""
    summary = pairwise_summary([comparison('A', 'B'), comparison('A', None), comparison(None, None),
                                comparison('B', 'A')])
    assert summary['win_rate'] == 0.5625 and summary['unparsed_verdicts'] == 3
    assert summary['ci95'] == pytest.approx([0.144091, 0.980909], abs=1e-6)
    assert describe({**summary, 'temperature': 0.5}) == ('T=0.5: win rate 0.562 [0.144, 0.981] (n=4, 3 of 8 verdicts '
                                                          'unparsed)')


def test_a_negative_kl_estimate_comes_with_its_caveat():
    """KL(π_T‖π_ref) ≥ 0, so a mean of −0.012 ± 0.008 over 16 samples is noise, 1.5 standard errors below 0; a positive
    estimate is printed plainly."""
    assert describe_kl({'mean': -0.012, 'stderr': 0.008}, 16) == (
        'KL(π_T‖π_ref) -0.012 ± 0.008 nats (negative: Monte-Carlo noise of 16 samples, 1.5 standard errors below 0; '
        'the KL itself is ≥ 0, so read it as about 0 and draw more samples, n_prompts or n_samples, for a sharper '
        'estimate)')
    assert describe({'temperature': 0.0, 'mean_score': 0.25, 'stderr': 0.04, 'n': 16,
                     'kl': {'mean': 3.2, 'stderr': 0.1}}) == 'T=0: mean score 0.25 ± 0.04 (n=16), KL(π_T‖π_ref) 3.2 ± 0.1 nats'


def test_the_plots_leave_out_temperatures_without_verdicts(tmp_path):
    """Two temperatures, one without verdicts: the win-rate plots show the other; with none left, no plot is written."""
    rows = [{'temperature': 0.0, **pairwise_summary([comparison('A', 'B'), comparison('B', 'A')]),
             'kl': {'mean': 1.0, 'stderr': 0.1}},
            {'temperature': 1.0, **pairwise_summary([comparison(None, None)]), 'kl': {'mean': 2.0, 'stderr': 0.1}}]
    results = {'pairwise': True, 'judge': 'llm:x', 'model': 'm', 'top_p': 0.9, 'temperatures': rows}
    assert [p.name for p in plot_results(results, tmp_path)] == ['win_rate_vs_temperature.png', 'win_rate_vs_kl.png']
    assert plot_results({**results, 'temperatures': rows[1:]}, tmp_path / 'none') == []


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """(local_dirs root, hf_model/ exported by a train.py run with render_hh_with_chat_template=true, the run dir)."""
    root = tmp_path_factory.mktemp('render')
    trainer = start_run([*FAST, 'loss=sft', 'render_hh_with_chat_template=true'], root)
    trainer.export_pretrained(root / 'hf_model')
    return root, root / 'hf_model'


def test_hf_model_carries_the_chat_rendering_flag(exported):
    """The export writes training_options.json beside config.json; load_model and trained_chat_rendering read it, and
    a model directory without it says nothing (None)."""
    root, hf_model = exported
    assert json.loads((hf_model / TRAINING_OPTIONS_FILE).read_text()) == {'render_hh_with_chat_template': True}
    assert load_model(str(hf_model), 'cpu', local_dirs=[str(root)]).render_hh_with_chat_template is True
    (hf_model / TRAINING_OPTIONS_FILE).rename(root / 'aside.json')
    try:
        assert trained_chat_rendering(str(hf_model)) is None
    finally:
        (root / 'aside.json').rename(hf_model / TRAINING_OPTIONS_FILE)


def test_evaluate_takes_render_hh_with_chat_template_from_the_model_unless_set(exported, tmp_path):
    """evaluate.yaml's render_hh_with_chat_template: null takes the model's (here true, from hf_model/), false and true
    override it; anything else is refused by name."""
    _, hf_model = exported
    options = lambda *extra: dataset_options(eval_config([f'model={hf_model}', 'out=x', *extra], tmp_path))
    assert options() == {'render_hh_with_chat_template': True}
    assert options('render_hh_with_chat_template=false') == {}
    assert dataset_options(eval_config(['model=embedded:tiny', 'out=x'], tmp_path)) == {}
    assert dataset_options(eval_config(['model=embedded:tiny', 'out=x', 'render_hh_with_chat_template=true'],
                                       tmp_path)) == {'render_hh_with_chat_template': True}
    config = eval_config(['model=embedded:tiny', 'out=x', 'render_hh_with_chat_template=maybe'], tmp_path)
    assert "render_hh_with_chat_template='maybe' must be true, false or null (take it from the model)" in \
        validate_config(config)
