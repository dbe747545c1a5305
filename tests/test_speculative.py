"Speculative decoding is lossless: greedy is token-identical, sampling matches the target's distribution."
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain_nb.core import set_seed, sampling_probs
from posttrain_nb.serve import medusa, speculative
from posttrain_nb.serve.speculative import (speculative_generate, speculative_decode, speculative_step_probs,
                                            verify_draft, residual_distribution, crop_cache, check_pair, accept_greedy,
                                            expected_tokens_per_call)
from posttrain_nb.core import eos_token_ids, forward_cached

V = 12

def tiny_llama(layers, seed, vocab=V):
    set_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()

@pytest.fixture(scope="module")
def pair():
    return tiny_llama(2, 0), tiny_llama(1, 1)

def chi2_pvalue(counts, probs):
    "Pearson χ² p-value, pooling bins whose expected count is below 5."
    n = counts.sum(); exp = probs * n
    keep = exp >= 5
    c = torch.cat([counts[keep], counts[~keep].sum()[None]]); e = torch.cat([exp[keep], exp[~keep].sum()[None]])
    if e[-1] < 5: c, e = c[:-1], e[:-1]
    stat = ((c - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(c) - 1) / 2, dtype=torch.float64), stat.double() / 2))

def greedy_reference(model, prompt, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()

@pytest.mark.parametrize("gamma", [1, 2, 5, 9])
def test_greedy_identical_to_target(pair, gamma):
    target, draft = pair
    g = torch.Generator().manual_seed(gamma)
    for _ in range(6):
        prompt = torch.randint(0, V, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        n = int(torch.randint(1, 30, (1,), generator=g))
        ids, st = speculative_generate(target, draft, prompt, max_new_tokens=n, gamma=gamma, eos_token_id=[])
        assert ids[0, len(prompt):].tolist() == greedy_reference(target, prompt, n)
        assert st.new_tokens == n and sum(a + 1 for a in st.accepted) >= n

def test_greedy_with_eos_stops_like_target(pair):
    target, draft = pair
    prompt = [3, 1, 4]
    full = greedy_reference(target, prompt, 25)
    eos = full[7]  # a token the target emits: decoding must stop right after its first occurrence
    ids, _ = speculative_generate(target, draft, prompt, max_new_tokens=25, gamma=4, eos_token_id=eos)
    assert ids[0, 3:].tolist() == full[:full.index(eos) + 1]

@pytest.mark.parametrize("top_k", [0, 5])
def test_sampling_matches_target_distribution(pair, top_k):
    target, draft = pair
    prompt, tau = [2, 7, 1], 0.8
    with torch.no_grad():
        p1 = sampling_probs(target(torch.tensor([prompt])).logits[0, -1], tau, top_k)
        nxt = sampling_probs(target(torch.tensor([prompt + [v] for v in range(V)])).logits[:, -1], tau, top_k)
    p2 = (p1[:, None] * nxt).sum(0)
    c1, c2 = torch.zeros(V), torch.zeros(V)
    for s in range(2000):
        ids, _ = speculative_generate(target, draft, prompt, max_new_tokens=2, gamma=3, temperature=tau,
                                      top_k=top_k, seed=s, eos_token_id=[])
        c1[ids[0, 3]] += 1; c2[ids[0, 4]] += 1
    assert chi2_pvalue(c1, p1) > 1e-3 and chi2_pvalue(c2, p2) > 1e-3

def test_rejection_rule_needs_the_residual():
    g = torch.Generator().manual_seed(0)
    p, q = (1.5 * torch.randn(6, generator=g)).softmax(-1), (1.5 * torch.randn(6, generator=g)).softmax(-1)
    P, Q = p.expand(3, -1), q.expand(2, -1)
    for residual, should_pass in ((True, True), (False, False)):
        counts = torch.zeros(6)
        for _ in range(12_000):
            d = torch.multinomial(q, 2, replacement=True, generator=g)
            n, t = verify_draft(P, Q, d, g, residual=residual)
            counts[int(d[0]) if n else t] += 1
        assert (chi2_pvalue(counts, p) > 1e-3) == should_pass

def test_step_probs_property():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st
    @settings(max_examples=60, deadline=None)
    @given(st.integers(2, 40), st.integers(0, 10_000), st.floats(0.1, 5.0))
    def check(v, seed, scale):
        g = torch.Generator().manual_seed(seed)
        p = (scale * torch.randn(v, generator=g, dtype=torch.float64)).softmax(-1)
        q = (scale * torch.randn(v, generator=g, dtype=torch.float64)).softmax(-1)
        assert torch.allclose(speculative_step_probs(p, q), p, atol=1e-9)
        r = residual_distribution(p, q)
        assert torch.all(r >= 0) and abs(float(r.sum()) - 1) < 1e-9
        assert torch.all(r[q >= p] == 0)  # the residual never puts mass where the draft already over-proposes
    check()

def test_cache_crop_and_draft_equal_target(pair):
    target, _ = pair
    with torch.no_grad():
        _, cache = forward_cached(target, input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    crop_cache(cache, 3)
    assert cache.get_seq_length() == 3
    with pytest.raises(ValueError, match="cannot crop"): crop_cache(cache, 4)
    ids, st = speculative_generate(target, target, [1, 2], max_new_tokens=20, gamma=4, eos_token_id=[])
    assert st.accepted[:-1] == [4] * (len(st.accepted) - 1)  # p == q: every draft accepted
    assert st.tokens_per_call == pytest.approx(20 / st.target_calls)
    assert expected_tokens_per_call(1.0, 4) == 5

def test_bad_input(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="different vocab sizes"): speculative_generate(target, tiny_llama(1, 0, 13), [1])
    with pytest.raises(ValueError, match="gamma"): speculative_generate(target, draft, [1], gamma=0)
    with pytest.raises(ValueError, match="temperature"): speculative_generate(target, draft, [1], temperature=-0.5)
    with pytest.raises(ValueError, match="batch size 1"): speculative_generate(target, draft, [[1], [2]])
    with pytest.raises(ValueError, match="non-empty"): speculative_generate(target, draft, [])


def test_context_limit_refused_like_generate(pair):
    "Issue 13 item 10: a 250-token prompt + 40 new tokens in a 256-token context was silently decoded to 290 tokens."
    t, d = pair
    t.config.max_position_embeddings = d.config.max_position_embeddings = 256
    try:
        prompt = [i % V for i in range(250)]
        with pytest.raises(ValueError, match="exceeds the model's context of 256"):
            speculative_generate(t, d, prompt, max_new_tokens=40, gamma=3)
        with pytest.raises(ValueError, match="exceeds the model's context of 256"):
            speculative_generate(t, d, prompt, max_new_tokens=40, gamma=3, temperature=1.0, seed=0)
        ids, _ = speculative_generate(t, d, prompt, max_new_tokens=6, gamma=3, eos_token_id=[])  # inside the context: fine
        assert ids.shape[1] == 256
    finally:
        t.config.max_position_embeddings = d.config.max_position_embeddings = 128


class _Tok:
    "Just enough tokenizer for the decode entry points: a prompt is its characters' codes modulo V."
    eos_token_id = None
    chat_template = None
    def __call__(self, texts, add_special_tokens=False): return {"input_ids": [[ord(c) % V for c in t] for t in texts]}
    def batch_decode(self, ids, skip_special_tokens=True): return ["".join(map(str, x)) for x in ids]


def test_decode_entry_points_check_every_prompt_first(pair):
    t, d = pair
    prompts = ["abc", "x" * 120]  # the second one plus 16 new tokens does not fit in 128 positions
    with pytest.raises(ValueError, match="prompt 1: .*exceeds the model's context of 128"):
        speculative.speculative_decode(t, d, _Tok(), prompts, max_new_tokens=16, chat=False)


def test_greedy_chain_acceptance_is_shared_and_stops_at_the_first_miss():
    T = torch.tensor
    assert medusa.accept_greedy is speculative.accept_greedy  # one rule for speculative decoding and Medusa
    assert accept_greedy(T([5, 8, 7]), T([5, 6, 7])) == 1  # counting all matches would say 2
    assert accept_greedy(T([5, 6, 7]), T([5, 6, 7, 1])) == 3
    assert accept_greedy(T([9, 6]), T([5, 6])) == 0
    n, tok = verify_draft(torch.eye(4)[[1, 2, 0, 3]], None, T([1, 3, 0]))  # target argmax rows: 1, 2, 0, 3
    assert (n, tok) == (1, 2)


def test_eos_ids_from_generation_config_list(pair):
    "Issue 15: the generation config's eos list ends decoding as HF generate does; nothing after it is returned."
    target, draft = pair
    prompt = [3, 1, 4]
    full = greedy_reference(target, prompt, 25)
    ends = [full[9], full[5]]  # two tokens the target emits: the earlier of them must end the output
    old = target.generation_config.eos_token_id
    target.generation_config.eos_token_id = ends
    try:
        assert eos_token_ids(target) == sorted(set(ends))
        with torch.no_grad():
            hf = target.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                                 do_sample=False, max_new_tokens=25, pad_token_id=0)[0, 3:].tolist()
        cut = min(full.index(e) for e in ends) + 1
        assert hf[:cut] == full[:cut]
        for gamma in (1, 3, 6):
            ids, st = speculative_generate(target, draft, prompt, max_new_tokens=25, gamma=gamma)
            assert ids[0, 3:].tolist() == full[:cut] and st.new_tokens == cut
    finally:
        target.generation_config.eos_token_id = old


@pytest.fixture(scope="module")
def zoo_pair():
    from posttrain_nb import zoo
    teacher, tok = zoo.load("teacher")
    draft, _ = zoo.load("draft")
    return teacher, draft, tok


def test_both_entry_points_stop_at_eos_like_hf_on_task_prompts(zoo_pair):
    "speculative_generate (the public name) and speculative_decode agree with HF greedy up to and including eos."
    from posttrain_nb.core import generate, render_prompts, encode_texts
    from posttrain_nb.tasks import ArithTask
    teacher, draft, tok = zoo_pair
    prompts = [it.prompt for it in ArithTask().sample(6, seed=0, split="test")]
    ref = generate(teacher, tok, prompts, max_new_tokens=48, batch_size=1)
    eos = eos_token_ids(teacher, tok)
    assert any(r and r[-1] in eos and len(r) < 48 for r in ref.completion_ids)  # some prompts end early: the test bites
    out, _ = speculative_decode(teacher, draft, tok, prompts, 48, gamma=4)
    assert out.completion_ids == ref.completion_ids
    for p, r in zip(encode_texts(tok, render_prompts(tok, prompts, True)), ref.completion_ids):
        ids, _ = speculative_generate(teacher, draft, p, 48, gamma=4)
        assert ids[0, len(p):].tolist() == r


# ---- speculative decoding inside the paged engine (LLM(..., speculative_model=, num_speculative_tokens=)) ----
from posttrain_nb.serve.engine import LLM
from posttrain_nb.serve.sampler import SamplingParams
from posttrain_nb.serve.medusa import MedusaHeads


def toks(outs): return [o.outputs[0].token_ids for o in outs]


def random_requests(n, seed, max_len=40):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    return [torch.randint(0, V, (r(1, 20),), generator=g).tolist() for _ in range(n)], [r(1, max_len) for _ in range(n)]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_engine_greedy_identical_to_no_draft(pair, k):
    "Lossless, greedy: the same engine with and without a draft emits the same tokens, for a poor draft and any k."
    target, draft = pair
    prompts, lens = random_requests(16, k)
    ps = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens]
    base = toks(LLM(target, block_size=4, num_gpu_blocks=120).generate(prompts, ps, use_tqdm=False))
    for spec_model in (draft, target, MedusaHeads(target, 3)):
        llm = LLM(target, block_size=4, num_gpu_blocks=120, speculative_model=spec_model, num_speculative_tokens=k)
        out = toks(llm.generate(prompts, ps, use_tqdm=False))
        assert out == base and [len(o) for o in out] == lens
        if spec_model is target: assert llm.spec.acceptance_rate == 1.0  # p == q: nothing is ever rejected
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks  # lookahead blocks all returned
        if hasattr(llm.spec.proposer, "bm"): assert llm.spec.proposer.bm.num_free_blocks == llm.spec.proposer.bm.num_blocks


def brute_force_marginals(target, prompt, tau):
    "Exact distributions of generated tokens 2 and 3 (marginal over the earlier ones), from V + V² target forwards."
    with torch.no_grad():
        P = lambda rows: sampling_probs(target(torch.tensor(rows)).logits[:, -1], tau)
        p1 = P([prompt])[0]
        p2_given = P([prompt + [a] for a in range(V)])  # [V, V]
        p3_given = P([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    p12 = p1[:, None] * p2_given
    return p12.sum(0), (p12[:, :, None] * p3_given).sum((0, 1))


@pytest.mark.parametrize("proposer", ["draft", "medusa"])
def test_engine_sampling_matches_target_distribution(pair, proposer):
    "Lossless, sampled: tokens 2 and 3 (drafted and verified in the engine) follow the target's distribution (χ²)."
    import copy
    target, draft = (copy.deepcopy(m) for m in pair)
    with torch.no_grad():  # random tiny models are near uniform; peaked distributions make a wrong rule visible
        target.lm_head.weight.mul_(25); draft.lm_head.weight.mul_(25)
    prompt, tau, n = [2, 7, 1], 1.0, 2500
    spec_model = draft if proposer == "draft" else MedusaHeads(target, 2)
    if proposer == "medusa":
        set_seed(3)
        for b in spec_model.blocks: torch.nn.init.normal_(b.linear.weight, std=0.5)  # heads that guess, often wrongly
    llm = LLM(target, block_size=4, num_gpu_blocks=4000, speculative_model=spec_model, num_speculative_tokens=3)
    out = llm.generate([prompt] * n, [SamplingParams(temperature=tau, max_tokens=4, seed=s, ignore_eos=True) for s in range(n)],
                       use_tqdm=False)
    toks = torch.tensor([o.outputs[0].token_ids for o in out])
    assert toks.shape == (n, 4) and 0 < llm.spec.acceptance_rate < 1  # drafts are both accepted and rejected
    p2, p3 = brute_force_marginals(target, prompt, tau)
    assert chi2_pvalue(torch.bincount(toks[:, 1], minlength=V).float(), p2) > 1e-3
    assert chi2_pvalue(torch.bincount(toks[:, 2], minlength=V).float(), p3) > 1e-3


def test_engine_speculative_soak(pair):
    "A few dozen mixed requests (greedy and sampled, n=2, stop ids, eos, chunked prefill, a pool small enough to preempt): no token after a stop, greedy ones equal the no-draft engine, every block comes back."
    target, draft = pair
    prompts, lens = random_requests(40, 7, max_len=30)
    ps = []
    for i, n in enumerate(lens):
        kind = i % 4
        if kind == 0: ps.append(SamplingParams(max_tokens=n, ignore_eos=True))
        elif kind == 1: ps.append(SamplingParams(max_tokens=n))  # the tiny config's eos id (2) ends it early
        elif kind == 2: ps.append(SamplingParams(max_tokens=n, stop_token_ids=[5, 9]))
        else: ps.append(SamplingParams(max_tokens=n, temperature=1.0, seed=i, n=2))
    base = LLM(target, block_size=4, num_gpu_blocks=60).generate(prompts, ps, use_tqdm=False)
    llm = LLM(target, block_size=4, num_gpu_blocks=30, max_num_seqs=16, max_num_batched_tokens=24,  # chunked prefill
              speculative_model=draft, num_speculative_tokens=4)  # mixes prompt chunks with speculative decodes
    out = llm.generate(prompts, ps, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0  # the small pool really preempted
    eos = eos_token_ids(target)
    for o, b, p in zip(out, base, ps):
        assert o.ok and o.finished and len(o.outputs) == p.n
        for c in o.outputs:
            stops = (p.stop_token_ids or []) + ([] if p.ignore_eos else eos)
            assert 1 <= len(c.token_ids) <= p.max_tokens
            assert not any(t in stops for t in c.token_ids[:-1])  # nothing after a stop token
            assert (c.token_ids[-1] in stops) == (c.finish_reason == "stop")
        if p.temperature == 0:
            assert o.outputs[0].token_ids == b.outputs[0].token_ids and o.outputs[0].finish_reason == b.outputs[0].finish_reason
    reasons = {c.finish_reason for o in out for c in o.outputs}
    assert {"stop", "length"} <= reasons
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert llm.spec.proposer.bm.num_free_blocks == llm.spec.proposer.bm.num_blocks and not llm.spec.proposer.states


def test_engine_speculative_bad_input(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1"): LLM(target, speculative_model=draft)
    with pytest.raises(ValueError, match="needs a speculative_model"): LLM(target, num_speculative_tokens=3)
    with pytest.raises(ValueError, match="different vocab sizes"):
        LLM(target, speculative_model=tiny_llama(1, 0, 13), num_speculative_tokens=2)


def test_engine_speculative_on_the_zoo_stops_at_eos(zoo_pair):
    "The zoo teacher with the zoo draft in the engine: identical to the engine without a draft, eos included."
    teacher, draft, tok = zoo_pair
    from posttrain_nb.tasks import ArithTask
    prompts = [it.prompt for it in ArithTask().sample(8, seed=1, split="test")]
    sp = SamplingParams(max_tokens=48)
    base = LLM(teacher, tok).generate(prompts, sp, use_tqdm=False)  # strings: rendered with the chat template
    llm = LLM(teacher, tok, speculative_model=draft, num_speculative_tokens=4)
    out = llm.generate(prompts, sp, use_tqdm=False)
    assert toks(out) == toks(base)
    assert any(o.outputs[0].finish_reason == "stop" for o in out) and llm.spec.acceptance_rate > 0.5
    sp = SamplingParams(max_tokens=48, stop=[". "])  # a stop string ends the text inside an accepted run of drafts
    base, out = (m.generate(prompts, sp, use_tqdm=False) for m in (LLM(teacher, tok), llm))
    assert [o.outputs[0].text for o in out] == [o.outputs[0].text for o in base] and toks(out) == toks(base)
    assert any(o.outputs[0].stop_reason == ". " for o in out)


def test_engine_requests_with_engine_only_sampling_are_not_speculated(pair):
    "Penalties, logprobs and min_tokens belong to the engine's sampler: such requests decode one token a step through it."
    target, draft = pair
    for sp in (SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
               SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2),
               SamplingParams(max_tokens=12, temperature=1.0, seed=0, min_p=0.2, ignore_eos=True)):
        base = LLM(target, block_size=4, num_gpu_blocks=60).generate([[1, 2, 3]], sp, use_tqdm=False)
        llm = LLM(target, block_size=4, num_gpu_blocks=60, speculative_model=draft, num_speculative_tokens=3)
        out = llm.generate([[1, 2, 3]], sp, use_tqdm=False)
        assert toks(out) == toks(base) and len(toks(out)[0]) == 12 and sum(llm.spec.stats.drafted) == 0


def test_engine_tokens_per_step_counts_only_kept_tokens(zoo_pair):
    "An eos inside an accepted run ends the request there; the tokens after it are not output and not counted."
    from posttrain_nb.tasks import ArithTask
    teacher, draft, tok = zoo_pair
    prompts = [it.prompt for it in ArithTask().sample(12, seed=1, split="test")]
    llm = LLM(teacher, tok, speculative_model=draft, num_speculative_tokens=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=48), use_tqdm=False)
    assert any(o.outputs[0].finish_reason == "stop" for o in outs)  # eos cut some requests short: the test bites
    # each request's first token comes from its prefill step; every later one from a speculative step
    assert llm.spec.stats.new_tokens == sum(len(o.outputs[0].token_ids) - 1 for o in outs)


def test_engine_speculation_pauses_above_the_batch_size_threshold(pair):
    """speculative_disable_by_batch_size (vLLM 0.x's switch): steps with more running sequences than the threshold decode
    without drafts; once requests finish and the batch is small enough, speculation resumes, the draft first catching up
    on the tokens it did not see. Greedy output stays identical to the engine without a draft."""
    target, draft = pair
    prompts, lens = random_requests(12, 7)
    ps = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens]
    base = toks(LLM(target, block_size=4, num_gpu_blocks=160).generate(prompts, ps, use_tqdm=False))
    llm = LLM(target, block_size=4, num_gpu_blocks=160, speculative_model=draft, num_speculative_tokens=3,
              speculative_disable_by_batch_size=4)
    assert toks(llm.generate(prompts, ps, use_tqdm=False)) == base
    assert llm.spec.num_paused_steps > 0 and sum(llm.spec.stats.drafted) > 0  # paused while 12 ran, resumed at 4 or fewer
    assert llm.spec.proposer.bm.num_free_blocks == llm.spec.proposer.bm.num_blocks
    never = LLM(target, block_size=4, num_gpu_blocks=160, speculative_model=draft, num_speculative_tokens=3,
                speculative_disable_by_batch_size=100)
    assert toks(never.generate(prompts, ps, use_tqdm=False)) == base and never.spec.num_paused_steps == 0
    with pytest.raises(ValueError, match="speculative_disable_by_batch_size"):
        LLM(target, speculative_model=draft, num_speculative_tokens=3, speculative_disable_by_batch_size=0)
