"""Retrieval heads: the attention-mass score against eager attention weights, and where dense heads go."""

import pytest
import torch
from tiny_models import ids_and_mask, plain_config, tiny_model

from mosa_retrofit import MoSAConfig, convert_
from mosa_retrofit.convert.retrieval import retrieval_scores
from mosa_retrofit.text.prompts import Prompt


def prompts(n=2, T=40):
    g = torch.Generator().manual_seed(1)
    return [Prompt(torch.randint(1, 128, (1, T), generator=g), answer_start=T - 3 - i, needle_at=5 + 3 * i, key="0",
                   filler_tokens=T, needle_tokens=4 + i) for i in range(n)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_score_is_the_attention_mass_from_answers_onto_the_key(family):
    model = tiny_model(family)
    ps = prompts()
    ref = {}
    eager = tiny_model(family, attn_implementation="eager")
    with torch.no_grad():
        for p in ps:
            att = eager(p.ids, output_attentions=True).attentions  # per layer (1, H, T, T)
            rows = slice(p.answer_start - 1, p.ids.shape[1] - 1)
            for layer, a in enumerate(att):
                mass = a[0, :, rows, p.needle_at: p.needle_at + p.needle_tokens].sum(-1).mean(-1)  # (H,)
                ref[layer] = ref.get(layer, 0) + mass
    ids, _ = ids_and_mask()
    with torch.no_grad():
        before = model(ids).logits
    scores = retrieval_scores(model, ps, progress=False)
    assert sorted(scores) == sorted(ref)
    for layer in ref:
        torch.testing.assert_close(scores[layer], ref[layer], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the model is left as it was
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    assert not any(hasattr(m, "mosa_retrieval_mass") for m in model.modules())


def test_dense_groups_go_where_the_scores_are():
    # tiny llama: 2 layers x 4 query heads in 2 KV groups of 2; a quarter of the heads dense = 1 group in all
    scores = {0: torch.tensor([0.1, 0.2, 0.4, 0.0]), 1: torch.tensor([0.9, 0.8, 0.0, 0.1])}  # groups .3 .4 | 1.7 .1
    cfg = dict(head_choice="retrieval", dense_heads=0.25, fill="zero", router_init="random", routing="expert_choice",
               dense_share=0.0)
    per_model = convert_(tiny_model("llama"), MoSAConfig(dense_scope="model", **cfg), retrieval=scores)
    assert per_model.config.mosa["dense_head_ids"] == {"0": [], "1": [0, 1]}  # 1 group in all: the best one
    per_layer = convert_(tiny_model("llama"), MoSAConfig(dense_scope="layer", **cfg), retrieval=scores)
    assert per_layer.config.mosa["dense_head_ids"] == {"0": [2, 3], "1": [0, 1]}  # the best group of each layer
    heads = convert_(tiny_model("llama"), MoSAConfig(dense_scope="model", router_granularity="head",
                                                     **{**cfg, "dense_heads": 0.5}), retrieval=scores)
    assert heads.config.mosa["dense_head_ids"] == {"0": [1, 2], "1": [0, 1]}  # the 4 best heads of 8


@pytest.mark.parametrize("share, dense", [(0.7, {"0": [], "1": [0, 1]}), (0.15, {"0": [2, 3], "1": [0, 1]}),
                                          (0.11, {"1": [0, 1]}), (0.01, {"1": [0, 1]})])
def test_groups_that_carry_dense_share_of_the_scores_stay_dense(share, dense):
    """Group scores 1.7 | 0.4, 0.3 | 0.1 (shares .68 | .16, .12 | .04): the count (a quarter: 1 group) is raised
    to every group whose share reaches ``dense_share`` (.15: 2; .11: 3, layer 0 then all dense and left as it
    is), and one group is always converted (.01 would keep all 4: 3 are kept)."""
    scores = {0: torch.tensor([0.1, 0.2, 0.4, 0.0]), 1: torch.tensor([0.9, 0.8, 0.0, 0.1])}
    cfg = dict(head_choice="retrieval", dense_heads=0.25, fill="zero", router_init="random", routing="expert_choice")
    model = convert_(tiny_model("llama"), MoSAConfig(dense_share=share, **cfg), retrieval=scores)
    assert model.config.mosa["dense_head_ids"] == dense


def test_bad_scope_and_missing_tokenizer_are_clear():
    with pytest.raises(ValueError, match="dense_scope must be one of"):
        MoSAConfig(dense_scope="global")
    with pytest.raises(ValueError, match="sink_tokens must be an integer >= 0"):
        MoSAConfig(sink_tokens=-1)
    with pytest.raises(ValueError, match="no tokenizer"):
        convert_(tiny_model("llama"), plain_config(head_choice="retrieval"))


def test_a_model_too_short_for_retrieval_prompts_gets_one_clear_line(tmp_path):
    from mosa_retrofit.cli.main import main
    from train_fixtures import make_world

    model_dir, _ = make_world(tmp_path)  # 128 positions
    with pytest.raises(ValueError, match="head_choice='retrieval' hides 4 keys in prompts of 128 tokens"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        convert_(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer=AutoTokenizer.from_pretrained(model_dir))
    assert main(["convert", str(model_dir), str(tmp_path / "out"), "--head-choice", "scored", "--no-check"]) == 0


def test_no_dense_heads_needs_no_retrieval_scores():
    """dense_heads=0 ranks nothing: the default head choice (retrieval) asks for no tokenizer and no prompts."""
    from mosa_retrofit.convert.surgery import mosa_layers

    calibration = torch.randint(1, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    model = convert_(tiny_model("llama"), MoSAConfig(dense_heads=0, sparsity=4), calibration=calibration,
                     progress=False)
    assert all(m.mosa_plan.dense == () for m in mosa_layers(model).values())
