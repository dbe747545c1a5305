"""posttrain-serve: OpenAI's client against the server on 127.0.0.1 (issue 15, item 4)."""
import asyncio, json, random, time, urllib.error, urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace as NS

import openai
import pytest

from posttrain_nb import zoo
from posttrain_nb.core import IncrementalDetokenizer
from posttrain_nb.serve.server import OpenAIServer, serve_in_thread


# ---- a test double with the engine's step-level API (vLLM's LLMEngine names) ----
@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None

@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None

@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list
    finished: bool
    metrics: object = None

@dataclass
class FakeParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop: list | None = None
    logprobs: int | None = None
    top_k: int = 0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    def __post_init__(self):
        if self.temperature == 0 and self.n > 1: raise ValueError("n > 1 with temperature=0 gives n identical samples")

class FakeLLM:
    "Token k of sample j of a request is a fixed function of its prompt: answers can be checked, mix-ups detected."
    def __init__(self, tokenizer, max_model_len=256, step_sleep=0.0):
        self.tokenizer, self.max_model_len, self.step_sleep = tokenizer, max_model_len, step_sleep
        self.V, self.reqs, self.aborted, self.steps = len(tokenizer), {}, [], 0
    @staticmethod
    def token(prompt, j, k, V): return (sum(prompt) * 31 + 7 * k + 13 * j) % (V - 10) + 10   # avoid special ids
    def add_request(self, rid, prompt, params):
        assert rid not in self.reqs, rid
        self.reqs[rid] = (list(prompt), params, [IncrementalDetokenizer(self.tokenizer, params.stop or ()) for _ in range(params.n)])
    def abort_request(self, rid):
        if self.reqs.pop(rid, None) is not None: self.aborted.append(rid)
    def has_unfinished_requests(self): return bool(self.reqs)
    def step(self):
        if self.step_sleep: time.sleep(self.step_sleep)
        self.steps += 1; outs = []
        for rid, (prompt, p, dets) in list(self.reqs.items()):
            comps = []
            for j, d in enumerate(dets):
                if not (d.finished or len(d.token_ids) >= p.max_tokens):
                    d.add(self.token(prompt, j, len(d.token_ids), self.V))
                    if len(d.token_ids) >= p.max_tokens and not d.finished: d.finish()
                fin = "stop" if d.finished else "length" if len(d.token_ids) >= p.max_tokens else None
                lps = [{t: Logprob(-0.5, 1)} for t in d.token_ids] if p.logprobs is not None else None
                comps.append(CompletionOutput(j, d.text if fin else d.visible_text, list(d.token_ids), None, lps, fin, d.stop_reason))
            done = all(c.finish_reason for c in comps)
            outs.append(RequestOutput(rid, None, prompt, comps, done))
            if done: del self.reqs[rid]
        return outs
    def reference(self, prompt, max_tokens, j=0):
        ids = [self.token(prompt, j, k, self.V) for k in range(max_tokens)]
        return self.tokenizer.decode(ids, skip_special_tokens=True), ids


def post(url, body:bytes):
    "Raw POST (for bodies the openai client would never send); returns (status, JSON)."
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())

@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(zoo.model_path("draft"))

@pytest.fixture(scope="module")
def fake(tok):
    llm = FakeLLM(tok)
    srv = OpenAIServer(llm, "fake", sampling_params_cls=FakeParams)
    with serve_in_thread(srv) as url: yield llm, srv, url


def test_fake_completion_and_stream(fake, tok):
    llm, srv, url = fake
    client = openai.OpenAI(base_url=url, api_key="none")
    assert [m.id for m in client.models.list()] == ["fake"]
    ids = tok("12+7=", add_special_tokens=True)["input_ids"]
    want, want_ids = llm.reference(ids, 9)
    r = client.completions.create(model="fake", prompt="12+7=", max_tokens=9, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 9)
    chunks = list(client.completions.create(model="fake", prompt="12+7=", max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 9


def test_fake_bad_requests(fake):
    _, _, url = fake
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    for kw, field in [(dict(temperature=-1), "temperature"), (dict(max_tokens=0), "max_tokens"),
                      (dict(presence_penalty=3), "presence_penalty"), (dict(max_tokens=10_000), "max_tokens"),
                      (dict(n=2, temperature=0), None), (dict(logit_bias={"5": 1}), "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="fake", prompt="hi", **kw)
        assert e.value.status_code == 400 and (field is None or field in e.value.message), (kw, e.value.message)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    status, body = post(f"{url}/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"], body


async def _load(url, prompts, max_tokens, n_abort, abort_tokens):
    "Send every prompt at once (odd ones streamed), plus n_abort long streams closed after two chunks; return texts."
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    async def one(i, p):
        if i % 2 == 0:
            r = await client.completions.create(model=None, prompt=p, max_tokens=max_tokens, temperature=0)
            return r.choices[0].text
        s = await client.completions.create(model=None, prompt=p, max_tokens=max_tokens, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in s])
    async def aborted(p):
        s = await client.completions.create(model=None, prompt=p, max_tokens=abort_tokens, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        got = 0
        async for c in s:
            got += 1
            if got == 2: break
        await s.close()
    res = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)], *[aborted(p) for p in prompts[:n_abort]])
    await client.close()
    return res[:len(prompts)]

def _wait(cond, timeout=20):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: return False
        time.sleep(0.05)
    return True


def test_fake_n_logprobs_chat_and_prompt_lists(fake, tok):
    llm, srv, url = fake
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    ids = [tok(p)["input_ids"] for p in ("1+1=", "2+2=")]
    r = client.completions.create(model="fake", prompt=["1+1=", "2+2="], max_tokens=5, n=2, temperature=1.0, logprobs=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]                     # prompt-major: index = prompt * n + sample
    for c in r.choices:
        text, tids = llm.reference(ids[c.index // 2], 5, j=c.index % 2)
        assert c.text == text and len(c.logprobs.tokens) == 5 and c.logprobs.token_logprobs == [-0.5] * 5
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (sum(map(len, ids)), 20)
    chunks = list(client.completions.create(model="fake", prompt=["1+1=", "2+2="], max_tokens=5, n=2, temperature=1.0,
                                            stream=True))
    for i in range(4):                                                     # each choice's pieces join to its own text
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == r.choices[i].text
        assert sum(c.choices[0].finish_reason == "length" for c in chunks if c.choices[0].index == i) == 1
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+4="}]
    cids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    want = llm.reference(cids, 6)[0]
    c = client.chat.completions.create(model="fake", messages=msgs, max_tokens=6, logprobs=True, top_logprobs=1)
    assert c.choices[0].message.content == want and c.choices[0].message.role == "assistant"
    assert len(c.choices[0].logprobs.content) == 6 and c.usage.prompt_tokens == len(cids)
    parts = list(client.chat.completions.create(model="fake", messages=msgs, max_tokens=6, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == want
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="fake", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])


def test_fake_stop_strings(fake, tok):
    llm, srv, url = fake
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    full = llm.reference(tok("9+9=")["input_ids"], 12)[0]
    stop = full[5:7]                                                       # a stop string inside the answer
    cut = full[:full.find(stop)]
    r = client.completions.create(model="fake", prompt="9+9=", max_tokens=12, stop=stop)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    s = "".join(c.choices[0].text for c in client.completions.create(model="fake", prompt="9+9=", max_tokens=12, stop=[stop], stream=True))
    assert s == cut


def test_fake_non_streaming_disconnect_aborts(tok):
    "A client that hangs up on a non-streaming request: the server notices within its 0.5 s poll and aborts it."
    import socket
    llm = FakeLLM(tok, step_sleep=0.02)                 # 200 tokens would take 4 s
    srv = OpenAIServer(llm, "fake", sampling_params_cls=FakeParams)
    with serve_in_thread(srv) as url:
        host, port = url.split("//")[1].split("/")[0].split(":")
        body = json.dumps({"prompt": "hang up", "max_tokens": 200}).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert _wait(lambda: llm.reqs, 5)           # it is being decoded
        t0 = time.time()
        assert _wait(lambda: llm.aborted, 5) and time.time() - t0 < 2 and llm.steps < 200
        assert _wait(lambda: srv.engine.num_in_flight == 0)


def test_console_script_help_and_bad_model(tmp_path, capsys):
    "posttrain-serve's --help (fastcore's parser of main) names its options; a bad MODEL exits 2 with a clear message."
    from fastcore.script import anno_parser
    from posttrain_nb.serve.server import main
    help_text = anno_parser(main, prog="posttrain-serve").format_help()
    assert all(o in help_text for o in ("--host", "--port", "--served-model-name", "zoo name"))
    with pytest.raises(SystemExit) as e: main(str(tmp_path / "nope"))
    assert e.value.code == 2 and "neither a zoo model" in capsys.readouterr().err


def test_load_engine_from_a_folder():
    "MODEL may be a checkpoint folder (here the zoo's own draft folder, given as a path)."
    from posttrain_nb.serve.server import load_engine
    llm = load_engine(str(zoo.model_path("draft")), max_num_seqs=4, max_model_len=None)
    assert llm.tokenizer is not None and llm.max_model_len == 256 and not llm.has_unfinished_requests()


# ---- the real engine (zoo "draft", the smallest model) ----
@pytest.fixture(scope="module")
def real():
    from posttrain_nb.serve.engine import LLM
    from posttrain_nb.serve.sampler import SamplingParams
    from posttrain_nb.tasks import ArithTask
    model, tok = zoo.load("draft")
    llm = LLM(model, tok)
    prompts = [i.prompt for i in ArithTask().sample(200, seed=0, split="test")]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    refs = llm.generate([{"prompt_token_ids": tok(p)["input_ids"]} for p in prompts], greedy, use_tqdm=False)
    chat_refs = llm.chat([[{"role": "user", "content": p}] for p in prompts[:3]], SamplingParams(max_tokens=16, temperature=0),
                         use_tqdm=False)
    aborted = []
    abort = llm.abort_request
    def recording_abort(rid): aborted.append(rid); return abort(rid)
    llm.abort_request = recording_abort                 # called from the engine thread only
    srv = OpenAIServer(llm, "draft")
    with serve_in_thread(srv) as url:
        yield NS(llm=llm, srv=srv, url=url, prompts=prompts, refs=[r.outputs[0] for r in refs],
                 chat_refs=[r.outputs[0] for r in chat_refs], aborted=aborted)


def test_greedy_equals_engine(real):
    client = openai.OpenAI(base_url=real.url, api_key="none", max_retries=0)
    for p, ref in zip(real.prompts[:3], real.refs):
        r = client.completions.create(model="draft", prompt=p, max_tokens=8, temperature=0)
        assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
        s = client.completions.create(model="draft", prompt=p, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in s) == ref.text
    for p, ref in zip(real.prompts, real.chat_refs):
        msgs = [{"role": "user", "content": p}]
        c = client.chat.completions.create(model="draft", messages=msgs, max_tokens=16, temperature=0)
        assert c.choices[0].message.content == ref.text and c.choices[0].finish_reason == ref.finish_reason
        s = client.chat.completions.create(model="draft", messages=msgs, max_tokens=16, temperature=0, stream=True)
        assert "".join(x.choices[0].delta.content or "" for x in s) == ref.text


def test_load_200_concurrent_with_aborts(real):
    texts = asyncio.run(_load(real.url, real.prompts, 8, 5, 200))
    assert texts == [r.text for r in real.refs]         # none lost, none mixed up: each equals its own greedy reference
    assert _wait(lambda: real.srv.engine.num_in_flight == 0 and not real.llm.has_unfinished_requests())
    assert len(real.aborted) == 5                       # the five closed streams were aborted inside the engine
    r = openai.OpenAI(base_url=real.url, api_key="none").completions.create(model="draft", prompt=real.prompts[7],
                                                                            max_tokens=8, temperature=0)
    assert r.choices[0].text == real.refs[7].text       # and the server still answers


def test_logprobs_and_stop_with_engine(real):
    client = openai.OpenAI(base_url=real.url, api_key="none", max_retries=0)
    p, ref = real.prompts[3], real.refs[3]
    r = client.completions.create(model="draft", prompt=p, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == ref.text and len(lp.tokens) == len(ref.token_ids)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):   # greedy: the chosen token is the most likely one
        assert len(top) == 3 and chosen <= 0 and abs(chosen - max(top.values())) < 1e-5
    stop = ref.text[3:5]                                            # a stop string inside the greedy answer
    r = client.completions.create(model="draft", prompt=p, max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].text == ref.text[:ref.text.find(stop)] and r.choices[0].finish_reason == "stop"
