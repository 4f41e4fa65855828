"""The few-shot canon's learners (Matching and Relation Networks, MTL, the task-adaptive MAML family, E3BM):
each one's defining behaviour, its model folder, and tasks vmapped together equal to tasks one by one."""
import json

import pytest
import torch
import torch.nn.functional as F

from meta_synthetic import ARCH_ARGS, SIZE, assert_together_equals_one_by_one, template_images
from purer.data import Episode, EpisodeSampler, TaskBatch
from purer.meta import (E3BM, MAML, MTL, E3BMConfig, HardTasks, InputSpec, MAMLConfig, MatchingConfig,
                        MatchingNetwork, MetaLearner, MTLConfig, RelationNetwork, TaskAdaptiveConfig,
                        TaskAdaptiveMAML, failure_labels, meta_step, random_model)
from purer.meta.mtl import freeze_as_buffers
from purer.meta.relation import map_depth

SPEC = InputSpec(1, SIZE, (0.5,), (0.25,))
INNER = MAMLConfig(inner_lr=0.3, inner_steps=2)
MAKERS = {
    "matching": lambda m: MatchingNetwork(m, SPEC),
    "matching-fce": lambda m: MatchingNetwork(m, SPEC, MatchingConfig(fce=True, processing_steps=2)),
    "relation": lambda m: RelationNetwork(m, SPEC),
    "mtl": lambda m: MTL(m, 5, SPEC, MTLConfig(inner_lr=0.1, inner_steps=3)),
    **{name: (lambda m, name=name: TaskAdaptiveMAML(m, 5, SPEC, INNER, TaskAdaptiveConfig.member(name)))
       for name in ("l2f", "alfa", "metal", "tao")},
    "e3bm": lambda m: E3BM.over(m, 5, SPEC, E3BMConfig(), maml=INNER),
    "e3bm-mtl": lambda m: E3BM.over(m, 5, SPEC, E3BMConfig(base="mtl"), mtl=MTLConfig(inner_lr=0.1, inner_steps=3)),
}


def tiny_model(seed=0):
    return random_model("conv4", 5, 1, SIZE, ARCH_ARGS, seed=seed)


def episodes(n=1, shot=2, query=3, seed=0, dtype=torch.float32):
    data = template_images(num_classes=9, seed=seed)
    sampler = EpisodeSampler(data.class_sizes(), 5, shot, query, seed=seed)
    eps = [data.episode(sampler.task(i)) for i in range(n)]
    return [Episode(e.support_x.to(dtype), e.support_y, e.query_x.to(dtype), e.query_y, e.classes) for e in eps]


# ---- each method's defining behaviour ---------------------------------------------------------------------------

def test_mtl_keeps_the_frozen_encoder_bit_identical_and_learns_only_ss_and_the_head():
    torch.manual_seed(0)
    pretrained = tiny_model(seed=3)
    learner = MTL(pretrained, 5, SPEC, MTLConfig(inner_lr=0.1, inner_steps=5))
    assert {n.split(".")[0] for n, _ in learner.named_parameters()} == {"scale", "shift", "head"}
    assert not list(learner.encoder.parameters())  # Θ is buffers: no optimiser can reach it
    frozen = {k: v.clone() for k, v in learner.encoder.state_dict().items()}
    x = torch.rand(6, 1, SIZE, SIZE)
    with torch.no_grad():  # at Φ_S1 = 1, Φ_S2 = 0 the SS encoder is the pre-trained one
        assert torch.allclose(learner.embed(x), pretrained.encoder(learner.prepare(x)), atol=1e-6)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for ep in episodes(3):
        meta_step(learner, optimizer, [ep])
    assert all(torch.equal(v, learner.encoder.state_dict()[k]) for k, v in frozen.items())
    moved = {n.split(".")[0] for n, p in learner.named_parameters() if not torch.equal(p, before[n])}
    assert {"scale", "head"} <= moved
    # Φ_S1 scales each kernel: scaling the first convolution's kernels by 2 is the network with 2W there
    conv = learner._convs[0]
    with torch.no_grad():
        learner.scale[conv.replace(".", "__")].fill_(2.0)
        doubled = learner.encoder.get_submodule(conv).weight * 2
        ss = learner.ss_weights()
    assert torch.equal(ss[f"{conv}.weight"], doubled)


def test_alfa_generates_different_learning_rates_for_two_tasks_and_updates_with_them():
    torch.manual_seed(0)
    learner = TaskAdaptiveMAML(tiny_model(), 5, SPEC, MAMLConfig(inner_lr=0.1, inner_steps=1),
                               TaskAdaptiveConfig.member("alfa"))
    params = dict(learner.model.named_parameters())
    generated, grads = [], []
    for ep in episodes(2):
        loss = F.cross_entropy(learner.model(learner.prepare(ep.support_x)), ep.support_y)
        g = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        generated.append(learner.update_rule.generate(params, g))
        grads.append(g)
    (alpha0, beta0), (alpha1, beta1) = generated
    assert alpha0.shape == (len(params),) and not torch.allclose(alpha0, alpha1, atol=1e-6)
    assert not torch.allclose(beta0, beta1, atol=1e-6)
    # θ' = (1 - β β0) θ - α α0 ∇, layer by layer
    ep = episodes(2)[0]
    fast = learner.adapt(ep.support_x, ep.support_y, 5)
    rule = learner.update_rule
    for i, (n, p) in enumerate(params.items()):
        expected = (1 - beta0[i] * rule.beta0[0, i]) * p - alpha0[i] * rule.alpha0[0, i] * grads[0][n]
        assert torch.allclose(fast[n], expected.detach(), atol=1e-6), n
    assert learner.tunable == ()  # the lr is generated, the steps fixed by the per-step terms
    with pytest.raises(ValueError, match="meta-learned for 1 inner steps"):
        learner.adapt(ep.support_x, ep.support_y, 5, steps=3)


def test_metal_loss_uses_the_query_images_but_never_their_labels():
    torch.manual_seed(0)
    learner = TaskAdaptiveMAML(tiny_model(), 5, SPEC, INNER, TaskAdaptiveConfig.member("metal"))
    assert learner.transductive and learner.tunable == ("lr",)
    ep, other = episodes(2)
    fast = learner.adapt(ep.support_x, ep.support_y, 5, query_x=ep.query_x)
    moved = learner.adapt(ep.support_x, ep.support_y, 5, query_x=other.query_x)
    assert any(not torch.allclose(fast[n], moved[n]) for n in fast)  # the query images enter the inner loss
    relabelled = Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y.roll(1), ep.classes)
    with torch.no_grad():
        assert torch.equal(learner.query_logits(ep), learner.query_logits(relabelled))  # their labels never do
    q = ep.query_x.clone().requires_grad_(True)
    fast = learner.adapt(ep.support_x, ep.support_y, 5, create_graph=True, query_x=q)
    (g,) = torch.autograd.grad(sum(v.sum() for v in fast.values()), q)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="query_x"):
        learner.adapt(ep.support_x, ep.support_y, 5)


def test_l2f_attenuates_the_initialisation_per_layer_conditioned_on_the_task():
    torch.manual_seed(0)
    learner = TaskAdaptiveMAML(tiny_model(), 5, SPEC, INNER, TaskAdaptiveConfig.member("l2f"))
    assert learner.tunable == ("lr", "steps")
    params = dict(learner.model.named_parameters())
    gammas = []
    for ep in episodes(2):
        start = learner.adapt(ep.support_x, ep.support_y, 5, steps=0)  # the attenuated initialisation alone
        loss = F.cross_entropy(learner.model(learner.prepare(ep.support_x)), ep.support_y)
        gamma = learner.attenuation.gamma(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
        assert ((gamma > 0) & (gamma < 1)).all()
        for i, (n, p) in enumerate(params.items()):
            assert torch.allclose(start[n], gamma[i].detach() * p.detach(), atol=1e-6), n
        gammas.append(gamma.detach())
    assert not torch.allclose(*gammas, atol=1e-7)


def test_the_family_with_plain_parts_is_maml():
    ep = episodes(1)[0]
    maml = MAML(tiny_model(), 5, SPEC, INNER)
    plain = TaskAdaptiveMAML(tiny_model(), 5, SPEC, INNER)
    assert plain.tunable == ("lr", "steps") and not plain.transductive
    a, b = maml.outer_loss(ep)[0], plain.outer_loss(ep)[0]
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a, list(maml.parameters()))
    gb = torch.autograd.grad(b, list(plain.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("base", ["maml", "mtl"])
def test_e3bm_weights_sum_to_one_and_an_ensemble_of_one_epoch_is_its_base_learner(base):
    torch.manual_seed(0)
    ep = episodes(1)[0]
    three = E3BM.over(tiny_model(), 5, SPEC, E3BMConfig(base=base), maml=MAMLConfig(inner_lr=0.3, inner_steps=3),
                      mtl=MTLConfig(inner_lr=0.3, inner_steps=3))
    state = three.adapt(ep.support_x, ep.support_y, 5)
    assert len(state["fast"]) == 3 and state["weights"].shape == (3,)
    assert torch.allclose(state["weights"].sum(), torch.tensor(1.0)) and (state["weights"] > 0).all()
    with torch.no_grad():  # weights are generated per task
        three.combination.init.copy_(torch.tensor([0.0, 1.0, 2.0]))
        three.combination.softweight = 10.0
    other = episodes(2)[1]
    w1 = three.adapt(ep.support_x, ep.support_y, 5)["weights"]
    w2 = three.adapt(other.support_x, other.support_y, 5)["weights"]
    assert not torch.allclose(w1, w2) and torch.allclose(w2.sum(), torch.tensor(1.0))

    one = E3BM.over(tiny_model(), 5, SPEC, E3BMConfig(base=base), maml=MAMLConfig(inner_lr=0.3, inner_steps=1),
                    mtl=MTLConfig(inner_lr=0.3, inner_steps=1))
    with torch.no_grad():  # its lr hyperprior gives the base learner's lr exactly
        one.basestep.weight.zero_()
        one.basestep.bias.zero_()
    plain = MAML(tiny_model(), 5, SPEC, MAMLConfig(inner_lr=0.3, inner_steps=1)) if base == "maml" else \
        MTL(tiny_model(), 5, SPEC, MTLConfig(inner_lr=0.3, inner_steps=1))
    assert float(one.adapt(ep.support_x, ep.support_y, 5)["weights"]) == 1.0
    assert torch.allclose(one.query_logits(ep), plain.query_logits(ep), atol=1e-6)
    assert three.tunable == ()


def test_relation_scores_lie_in_0_1_and_train_on_the_squared_error_to_the_one_hot_label():
    torch.manual_seed(0)
    learner = RelationNetwork(tiny_model(), SPEC)
    ep = episodes(1, shot=3)[0]
    scores = learner.query_logits(ep)
    assert scores.shape == (15, 5) and ((scores >= 0) & (scores <= 1)).all()
    expected = (scores - F.one_hot(ep.query_y, 5)).square().sum(-1).mean()
    assert torch.allclose(learner.outer_loss(ep)[0], expected, atol=1e-6)
    # the K-shot class map is the sum of its support maps
    maps = learner.feature_maps(learner.prepare(ep.support_x))
    assert torch.allclose(learner.adapt(ep.support_x, ep.support_y, 5)[2], maps[ep.support_y == 2].sum(0), atol=1e-5)
    with pytest.raises(ValueError, match="feature maps"):
        map_depth(torch.nn.Linear(3, 3), "tv:mobilenet_v3_small")


def test_matching_nets_without_fce_are_cosine_attention_over_the_support_set():
    torch.manual_seed(0)
    learner = MatchingNetwork(tiny_model(), SPEC)
    ep = episodes(1, shot=2)[0]
    with torch.no_grad():
        logits = learner.query_logits(ep)
        f_s, f_q = learner.embed(ep.support_x), learner.embed(ep.query_x)
        attention = torch.softmax(F.cosine_similarity(f_q[:, None], f_s[None], dim=-1), dim=-1)  # [B, M]
        expected = attention @ F.one_hot(ep.support_y, 5).float()
    assert torch.allclose(logits.exp(), expected, atol=1e-5)
    fce = MatchingNetwork(tiny_model(), SPEC, MatchingConfig(fce=True))
    with torch.no_grad():  # with full context embeddings the support set's context changes the prediction
        assert not torch.allclose(fce.query_logits(ep).exp(), expected, atol=1e-3)
        assert torch.allclose(fce.query_logits(ep).exp().sum(-1), torch.ones(15), atol=1e-5)


def test_hard_tasks_resample_the_classes_tasks_failed_on():
    logits = torch.tensor([[[5.0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]],
                           [[0.0, 5, 0], [5, 0, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5]]])  # 2 tasks, 3-way
    assert failure_labels(logits).tolist() == [2, 0]  # task 0 misses a query of label 2, task 1 one of label 0
    sizes = [6] * 12
    hard = HardTasks(sizes, way=3, shot=1, query=2, hard=1, seed=0)
    sampler = EpisodeSampler(sizes, 3, 1, 2, seed=0)
    specs = [sampler.task(i) for i in range(4)]
    pool = hard.record([], specs[:2], [2, 0])
    assert pool == list(dict.fromkeys([int(specs[0].classes[2]), int(specs[1].classes[0])]))  # distinct, in order
    assert hard.record(pool, specs[:1], [2]) == pool
    same, kept = hard.batch([3, 7], 7, specs)
    assert same == specs and kept == [3, 7]  # fewer than `way` failure classes: no hard task yet
    pool = [3, 7, 9]
    batch, left = hard.batch(pool, 7, specs)
    assert batch[:3] == specs[:3] and left == []
    assert set(batch[3].classes.tolist()) == set(pool)  # the last task re-sampled from the failure classes
    assert hard.batch(pool, 7, specs)[0][3].to_json() == batch[3].to_json()  # seeded by the iteration


# ---- every learner: its model folder, and tasks together equal tasks one by one --------------------------------

@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_a_saved_learner_reloads_to_the_same_predictions(kind, tmp_path):
    torch.manual_seed(0)
    learner = MAKERS[kind](tiny_model(seed=2))
    with torch.no_grad():  # move every weight off its initial value, so the folder must carry them all
        for p in learner.parameters():
            p.add_(0.01 * torch.randn_like(p))
    learner.test_time = {1: {"lr": 0.2}} if "lr" in learner.tunable else {1: {}}
    learner.save_pretrained(tmp_path / "learner", selected={"iteration": 3})
    loaded = MetaLearner.from_pretrained(tmp_path / "learner")
    config = json.loads((tmp_path / "learner" / "config.json").read_text())
    assert type(loaded) is type(learner) and config["learner"] == learner.kind and not loaded.training
    assert loaded.test_time_settings(1) == learner.test_time_settings(1)
    assert set(loaded.state_dict()) == set(learner.state_dict())
    ep = episodes(1)[0]
    learner.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.query_logits(ep), learner.query_logits(ep), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_tasks_adapted_together_equal_tasks_adapted_one_by_one(kind):
    """vmap over tasks (each its own BatchNorm batch) gives the per-task logits and the same meta-gradient."""
    torch.manual_seed(0)
    learner = MAKERS[kind](tiny_model(seed=1)).double()
    assert learner.tasks_together(torch.device("cpu")) is False  # auto: loop on a CPU
    assert_together_equals_one_by_one(learner, TaskBatch.stack(episodes(3, dtype=torch.float64)))


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_the_outer_loss_reaches_the_support_and_query_images(kind):
    """What the Gradient Switch's adversarial term needs: a gradient on both sets of pseudo images (in eval
    mode too)."""
    torch.manual_seed(0)
    learner = MAKERS[kind](tiny_model()).eval()
    ep = episodes(1)[0]
    ep.support_x.requires_grad_(True)
    ep.query_x.requires_grad_(True)
    loss, acc = learner.outer_loss(ep)
    loss.backward()
    assert 0 <= float(acc) <= 1 and ep.support_x.grad.abs().sum() > 0 and ep.query_x.grad.abs().sum() > 0


def test_freeze_as_buffers_keeps_the_weights_and_their_names():
    net = tiny_model().encoder
    names = {n: p.detach().clone() for n, p in net.named_parameters()}
    frozen = freeze_as_buffers(net)
    assert not list(frozen.parameters())
    assert all(torch.equal(frozen.state_dict()[n], v) for n, v in names.items())


@pytest.mark.parametrize("learner", ["l2f", "alfa", "metal", "tao", "matching", "relation", "mtl", "e3bm"])
def test_a_run_draws_a_learners_own_modules_from_its_seed_and_leaves_the_global_generator_alone(learner):
    """Two runs of one config are one run: the modules a learner adds to its network (L2F's MLP, the relation
    module, E3BM's hyperpriors, ...) come from the run's seed, whatever the global generator's state."""
    from purer.pipeline.build import wrap_learner
    from purer.pipeline.run_config import MetaConfig

    meta = MetaConfig(learner=learner, way=5, maml=INNER, matching=MatchingConfig(fce=True, processing_steps=2))
    states = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        states.append(wrap_learner(meta, tiny_model(), SPEC, seed=7).state_dict())
        assert torch.equal(torch.random.get_rng_state(), before)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = wrap_learner(meta, tiny_model(), SPEC, seed=8).state_dict()
    if learner != "mtl":  # MTL's own parameters (scaling 1, shifting 0) start the same for every seed
        assert any(not torch.equal(states[0][k], other[k]) for k in states[0])
