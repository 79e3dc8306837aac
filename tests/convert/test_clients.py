"""transformers' client APIs on a saved and reloaded causal-routing model: ``pipeline("text-generation")``, text
streamers, chat templates and batched generation with left padding, each against an independent reference
(mostly ``generate(use_cache=False)``: a full forward per step, no sparse cache)."""

from __future__ import annotations

import contextlib
import io
import threading

import pytest
import torch
import transformers as tf
from tiny_models import fake_retrieval
from train_fixtures import make_world

import mosa_retrofit
from mosa_retrofit import MoSAConfig, convert_
from mosa_retrofit.convert.attention import mosa_layers
from mosa_retrofit.convert.cache import layer_stores
from mosa_retrofit.convert.compat import output_cache, with_cache

# The default conversion (key-selection heads, calibrated causal routers, straight-through scores) with a
# 4-token window and sparsity 4: the default 256-token window would hold every token of these short prompts,
# so the sparse store would never drop a row.
# dense_share=0: a tiny model has a few KV groups, each holding a large share of fake retrieval scores; the count
# alone keeps one group dense, so that most of the model decodes through key-selection units
DEFAULT = dict(local_window=4, sparsity=4, dense_share=0.0)
# The paper's MoSA heads (routed queries attend routed keys, output only there) with causal routing.
PAPER_CAUSAL = dict(sparse_heads="mosa", dense_scope="layer", routing="causal", sparsity=4, dense_heads=1,
                    head_choice="first", router_init="random", fill="zero", router_granularity="head")
KINDS = {"mosa_keys": DEFAULT, "mosa_causal": PAPER_CAUSAL}

PROMPTS = ["The cat sees", "A small bird follows the old man. My sister", "the king"]
# (the tiny BPE tokenizer knows only the corpus' characters: no "<", ">" or ":" outside <eos>)
CHAT_TEMPLATE = ("{% for m in messages %}{{m.role}}\n{{m.content}}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}assistant\n{% endif %}")
NEW = 12
GREEDY = dict(max_new_tokens=NEW, do_sample=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these tiny models: many small ops per decoding step, which on a busy 2-core machine
    run several times slower with two threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(KINDS))
def converted(request, tmp_path_factory):
    """(model loaded with mosa_retrofit.load, the folder with its tokenizer) for one conversion kind."""
    root = tmp_path_factory.mktemp(request.param)
    base_dir, corpus = make_world(root, positions=1024)
    tok = tf.AutoTokenizer.from_pretrained(base_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # larger weights than the default init: heads differ and greedy choices are clear
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    config = MoSAConfig(**KINDS[request.param])
    if config.router_init == "calibrated":  # the default conversion: calibration text from the tokenizer
        # (given retrieval scores: measuring them on 16 prompts of 1,024 tokens would take most of the runtime)
        convert_(model, config, tokenizer=tok, retrieval=fake_retrieval(model), progress=False)
    else:  # thresholds on the world's own text
        ids = tok(corpus.read_text(), return_tensors="pt").input_ids[0, :512]
        convert_(model, config, calibration=ids.view(8, 64), progress=False)
    path = root / "converted"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    loaded = mosa_retrofit.load(str(path)).eval()
    assert mosa_layers(loaded) and loaded.config.mosa["routing"] == "causal"
    assert loaded.config.mosa["sparse_heads"] == config.sparse_heads
    return loaded, path


@contextlib.contextmanager
def sparse_cache_spy(model):
    """Records every KV cache the model's forward receives; on exit, checks that generation ran through the
    sparse stores (every converted layer has one) and that they hold fewer rows than the tokens seen."""
    caches = []

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and all(c is not cache for c in caches):
            caches.append(cache)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield caches
    finally:
        handle.remove()
    assert caches, "generation ran without a KV cache"
    for cache in caches:
        stores = layer_stores(cache)
        assert sorted(stores) == sorted(mosa_layers(model))
        rows = seen = 0
        for s in stores.values():
            held = s.routed.count if s.routed is not None else s.window.count + s.window.ring_valid.sum(-1)  # (E, B)
            rows, seen = rows + int(held.sum()), seen + held.numel() * s.seen
        assert 0 < rows < seen, (rows, seen)  # sparse: not every token is cached


def encode(tok, text):
    return tok(text, return_tensors="pt").input_ids


def greedy(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **{**GREEDY, **kw})


def new_text(tok, out, prompt_len):
    return tok.decode(out[0, prompt_len:], skip_special_tokens=True)


def test_pipeline_greedy_equals_generate_without_cache(converted):
    model, path = converted
    tok = tf.AutoTokenizer.from_pretrained(path)  # a fresh one per test: tests set templates and padding
    pipe = tf.pipeline("text-generation", model=model, tokenizer=tok)
    lengths = []
    for prompt in PROMPTS:
        ids = encode(tok, prompt)
        ref = greedy(model, ids, use_cache=False)
        lengths.append(ref.shape[1] - ids.shape[1])
        with sparse_cache_spy(model):
            out = pipe(prompt, return_full_text=False, **GREEDY)
        assert out[0]["generated_text"] == new_text(tok, ref, ids.shape[1])
        full = pipe(prompt, **GREEDY)[0]["generated_text"]
        assert full == prompt + new_text(tok, ref, ids.shape[1])
    assert max(lengths) == NEW  # not every prompt ends at once on <eos>: the comparison covers decoding steps


def test_streamers_yield_the_non_streamed_text(converted):
    model, path = converted
    tok = tf.AutoTokenizer.from_pretrained(path)
    for prompt in PROMPTS:
        ids = encode(tok, prompt)
        ref = greedy(model, ids)
        assert torch.equal(ref, greedy(model, ids, use_cache=False))
        want = new_text(tok, ref, ids.shape[1])

        streamer = tf.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **GREEDY)
        thread = threading.Thread(target=lambda: model.generate(**kwargs))
        thread.start()
        pieces = list(streamer)
        thread.join()
        assert "".join(pieces) == want

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            out = greedy(model, ids, streamer=tf.TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
        assert torch.equal(out, ref)
        assert buf.getvalue() == want + "\n"  # TextStreamer ends the stream with a newline

        # the pipeline takes a streamer too
        streamer = tf.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
        pipe = tf.pipeline("text-generation", model=model, tokenizer=tok)
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=pipe(prompt, streamer=streamer,
                                                                        return_full_text=False, **GREEDY)))
        thread.start()
        pieces = list(streamer)
        thread.join()
        assert "".join(pieces) == want == result["out"][0]["generated_text"]


def test_chat_template_and_chat_pipeline(converted):
    model, path = converted
    tok = tf.AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    pipe = tf.pipeline("text-generation", model=model, tokenizer=tok)
    for content in ("the cat sees", "A dog follows the river."):
        messages = [{"role": "user", "content": content}]
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc  # a BatchEncoding (transformers 5) or the ids
        by_hand = (tok.encode(f"user\n{content}", add_special_tokens=False) + [tok.eos_token_id]
                   + tok.encode("assistant\n", add_special_tokens=False))
        assert ids[0].tolist() == by_hand
        assert tok.decode(by_hand) == f"user\n{content}<eos>assistant\n"
        ref = greedy(model, ids, use_cache=False)
        assert torch.equal(greedy(model, ids), ref)

        with sparse_cache_spy(model):
            out = pipe(messages, **GREEDY)[0]["generated_text"]
        assert out[:-1] == messages
        assert out[-1] == {"role": "assistant", "content": new_text(tok, ref, ids.shape[1])}
        assert pipe(messages, return_full_text=False, **GREEDY)[0]["generated_text"] == out[-1]["content"]

    # a second turn that reuses the first turn's sparse cache (only the new tokens are processed)
    first = model.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **GREEDY)
    turn = torch.cat([first.sequences, torch.tensor([[tok.eos_token_id]]),
                      tok.apply_chat_template([{"role": "user", "content": "the moon"}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]], 1)
    with torch.no_grad():
        again = model.generate(turn, attention_mask=torch.ones_like(turn), **with_cache(model, output_cache(first)),
                               **GREEDY)
    assert torch.equal(again, greedy(model, turn, use_cache=False))


def _trim(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def left_padded(path):
    """The tokenizer set to pad on the left (with EOS) and PROMPTS padded into one batch."""
    tok = tf.AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    return tok, tok(PROMPTS, return_tensors="pt", padding=True)


def test_batched_left_padding_equals_each_prompt_alone(converted):
    model, path = converted
    tok, batch = left_padded(path)
    eos = tok.eos_token_id
    lengths = [len(tok(p).input_ids) for p in PROMPTS]
    assert len(set(lengths)) == 3 and (batch.attention_mask == 0).any()
    width = batch.input_ids.shape[1]
    opts = dict(attention_mask=batch.attention_mask, pad_token_id=tok.pad_token_id, **GREEDY)

    with torch.no_grad():
        with sparse_cache_spy(model):
            cached = model.generate(batch.input_ids, **opts)
        uncached = model.generate(batch.input_ids, use_cache=False, **opts)
    assert torch.equal(cached, uncached)
    for r, prompt in enumerate(PROMPTS):
        ids = encode(tok, prompt)
        alone = greedy(model, ids, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        row = cached[r, width:].tolist()
        assert _trim(row, eos) == alone
        assert all(t == tok.pad_token_id for t in row[len(alone):])  # finished rows are padded
    assert max(len(_trim(cached[r, width:].tolist(), eos)) for r in range(3)) == NEW

    with torch.no_grad():  # sampling: the same seed, with and without the sparse cache
        torch.manual_seed(7)
        sample = model.generate(batch.input_ids, **{**opts, "do_sample": True, "top_k": 20})
        torch.manual_seed(7)
        sample_nc = model.generate(batch.input_ids, use_cache=False, **{**opts, "do_sample": True, "top_k": 20})
    assert torch.equal(sample, sample_nc)
    with torch.no_grad():  # several samples per prompt: the cache is expanded to 2 rows per prompt
        torch.manual_seed(8)
        many = model.generate(batch.input_ids, **{**opts, "do_sample": True, "num_return_sequences": 2})
        torch.manual_seed(8)
        many_nc = model.generate(batch.input_ids, use_cache=False,
                                 **{**opts, "do_sample": True, "num_return_sequences": 2})
    assert many.shape[0] == 6 and torch.equal(many, many_nc)

    # the pipeline pads and batches the prompts itself
    pipe = tf.pipeline("text-generation", model=model, tokenizer=tok)
    batched = pipe(PROMPTS, batch_size=3, return_full_text=False, **GREEDY)
    for r, prompt in enumerate(PROMPTS):
        ids = encode(tok, prompt)
        assert batched[r][0]["generated_text"] == new_text(tok, greedy(model, ids, use_cache=False), ids.shape[1])


def test_batched_beam_search_with_left_padding(converted):
    model, path = converted
    tok, batch = left_padded(path)
    width = batch.input_ids.shape[1]
    opts = dict(attention_mask=batch.attention_mask, pad_token_id=tok.pad_token_id, num_beams=2, **GREEDY)
    with torch.no_grad():
        with sparse_cache_spy(model):
            beam = model.generate(batch.input_ids, **opts)
        beam_nc = model.generate(batch.input_ids, use_cache=False, **opts)
    assert torch.equal(beam, beam_nc)
    for r, prompt in enumerate(PROMPTS):
        ids = encode(tok, prompt)
        with torch.no_grad():
            alone = model.generate(ids, **{**opts, "attention_mask": torch.ones_like(ids)})
        row = beam[r, width:].tolist()
        assert _trim(row, tok.eos_token_id) == _trim(alone[0, ids.shape[1]:].tolist(), tok.eos_token_id)
