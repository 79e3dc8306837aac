"""train/stages.py: every stage kind a recipe names is registered."""



def test_every_recipe_stage_kind_is_a_registered_stage():
    from mosa_retrofit.train.recipe import STAGE_KINDS
    from mosa_retrofit.train.stages import STAGES

    assert set(STAGES) == set(STAGE_KINDS)
    assert [STAGES[k].local for k in ("router_warmup", "layer_distill", "adaptation")] == [True, True, False]
