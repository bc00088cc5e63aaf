"""The serving library's parts on their own: sampling, the content filter, auth, audit redaction,
the tokenizer codec."""

from __future__ import annotations

import pytest
import torch

from dsk.errors import DskError
from dsk.serving.audit import redact
from dsk.serving.auth import KeyChecker, collect_keys, key_id
from dsk.serving.engine import _partial_suffix
from dsk.serving.filter import ContentFilter
from dsk.serving.sampling import SamplingParams, SequenceSampler, apply_penalties, sample_next

V = 16


def sampler(**kw) -> SequenceSampler:
    prompt = kw.pop("prompt", [1, 2])
    return SequenceSampler(SamplingParams(**kw), prompt, V)


# --------------------------------------------------------------------------- sampling


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax():
    logits = torch.randn(3, V)
    rows = [sampler(temperature=0.0), sampler(temperature=1.5, top_k=1, seed=1), sampler(temperature=1.0, top_p=1e-6, seed=2)]
    assert sample_next(logits, rows).tolist() == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.linspace(0, 1, V)[None].repeat(200, 1)
    rows = [sampler(temperature=5.0, top_k=3, seed=i) for i in range(200)]
    tokens = set(sample_next(logits, rows).tolist())
    assert tokens <= {V - 1, V - 2, V - 3} and len(tokens) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4)) + 1e-9
    logits = probs.log()[None].repeat(300, 1)
    rows = [sampler(temperature=1.0, top_p=0.7, seed=i) for i in range(300)]
    assert set(sample_next(logits, rows).tolist()) == {0, 1}


def test_a_seed_reproduces_and_rows_do_not_share_randomness():
    logits = torch.zeros(4, V)
    a = sample_next(logits, [sampler(seed=5) for _ in range(4)]).tolist()
    assert len(set(a)) == 1  # same seed, same draw, whatever the row
    b = [sample_next(logits[:1], [sampler(seed=5)]).item()]
    assert a[0] == b[0]
    many = [sample_next(logits[:1], [sampler(seed=s)]).item() for s in range(40)]
    assert len(set(many)) > 5


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0] + [0.0] * (V - 4))
    s = sampler(repetition_penalty=2.0, prompt=[0, 1])
    out = apply_penalties(logits, s)
    assert out[0] == 1.0 and out[1] == -4.0 and out[2] == 1.0  # seen: positive halved, negative doubled
    s = sampler(frequency_penalty=0.5, presence_penalty=0.25, prompt=[])
    for tok in (2, 2, 3):
        s.observe(tok)
    out = apply_penalties(logits, s)
    assert out[2] == pytest.approx(1.0 - 2 * 0.5 - 0.25) and out[3] == pytest.approx(1.0 - 0.5 - 0.25)
    assert out[0] == 2.0


def test_partial_stop_suffix():
    assert _partial_suffix("hello wo", "world") == 2
    assert _partial_suffix("hello", "world") == 0
    assert _partial_suffix("abc", "c") == 0  # a whole match is found by find(), not held back


# --------------------------------------------------------------------------- content filter


def test_filter_words_regexes_and_streaming_holdback():
    f = ContentFilter.from_lines(["# comment", "", "BadWord", r"re:\b\d{3}-\d{4}\b", "c++"])
    assert f.check("a badword here").rule == "BadWord"
    assert f.check("badwords are fine") is None
    assert f.check("call 555-1234 now").line == 4
    assert f.check("I like C++ a lot").rule == "c++"
    # streaming: hold back only what could still become a match
    assert f.safe_length("all clear") == len("all clear")
    assert f.safe_length("this is bad") == len("this is ")
    assert f.safe_length("call 555-12") == len("call ")
    assert f.check("the badword", final=False) is None  # could still become "badwords"
    assert f.check("the badword", final=True).start == 4


def test_filter_file_errors(tmp_path):
    with pytest.raises(DskError, match="does not exist"):
        ContentFilter.load(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\nre:(\n")
    with pytest.raises(DskError, match="line 2"):
        ContentFilter.load(bad)


# --------------------------------------------------------------------------- auth and audit


def test_keys_from_option_and_environment():
    assert collect_keys("a, b", {"DSK_API_KEYS": "b,c"}) == ["a", "b", "c"]
    checker = KeyChecker(["alpha", "beta"])
    assert checker.check("Bearer beta") == key_id("beta")
    assert checker.check("Bearer gamma") is None and checker.check(None) is None and checker.check("beta") is None
    assert "beta" not in key_id("beta")
    assert KeyChecker([]).check(None) == "anonymous"


def test_redaction():
    text = "mail john.smith@corp.example.org, call (415) 555-0199 or +44 20 7946 0958; 3 apples, year 2024"
    out = redact(text)
    assert "[EMAIL]" in out and out.count("[PHONE]") == 2
    assert "3 apples" in out and "2024" in out


# --------------------------------------------------------------------------- codec


def test_chat_without_chat_tokens_uses_a_plain_transcript():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsk.data.tokenizer import Tokenizer as DskTokenizer
    from dsk.serving.text import TextCodec

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["hello there"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    codec = TextCodec(DskTokenizer(hf))
    assert not codec.has_chat_tokens and codec.chat_stop
    ids = codec.chat_ids([{"role": "user", "content": "hi"}])
    assert codec.decode(ids) == "User: hi\nAssistant:"
    assert codec.stop_ids == {hf.token_to_id("<|endoftext|>")}


# --------------------------------------------------------------------------- absorbed MLA decode


def test_absorbed_mla_decode_matches_the_model():
    from dsk.models import ModelConfig, Transformer
    from dsk.serving.fast_mla import install_absorbed_mla

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=64, q_lora_rank=16)
    reference, fast = Transformer(cfg).eval(), Transformer(cfg).eval()
    fast.load_state_dict(reference.state_dict())
    assert install_absorbed_mla(fast) == cfg.n_layers
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        caches = [m.new_cache(3, 32) for m in (reference, fast)]
        lengths = torch.tensor([9, 5, 7])  # rows at different positions, as in the engine
        for m, c in zip((reference, fast), caches):
            m(ids, cache=c, start_pos=torch.zeros(3, dtype=torch.long))
        nxt = torch.randint(0, 64, (3, 1))
        for _ in range(4):
            a = reference(nxt, cache=caches[0], start_pos=lengths).logits
            b = fast(nxt, cache=caches[1], start_pos=lengths).logits
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
            lengths = lengths + 1
            nxt = a[:, -1:].argmax(-1)
        # prefill (several tokens) runs the model's own code
        assert torch.equal(reference(ids).logits, fast(ids).logits)
    dense = Transformer(ModelConfig.preset("tiny-dense", vocab_size=64))
    assert install_absorbed_mla(dense) == 0  # no MLA layers: nothing to switch


# --------------------------------------------------------------------------- batched sampling + fixed-shape steps


def test_batched_sampler_applies_each_rows_penalties():
    from dsk.serving.sampling import BatchSampler, sample_rows

    torch.manual_seed(0)
    logits = torch.randn(6, V)
    settings = [dict(temperature=0.0), dict(temperature=0.0, repetition_penalty=3.0, prompt=[3, 4, 5]),
                dict(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
                dict(temperature=0.0, frequency_penalty=-2.0), dict(temperature=0.0, repetition_penalty=0.2),
                dict(temperature=0.0, presence_penalty=4.0, prompt=[])]
    rows = [sampler(**kw) for kw in settings]
    state = BatchSampler(len(rows), V, torch.device("cpu"))
    for r, s in enumerate(rows):
        state.set_row(r, s)
    for step in range(5):  # greedy rows: the argmax of exactly the per-row reference penalties
        tokens = state.sample(logits, 0)
        expected = [int(apply_penalties(logits[r], s).argmax()) if s.params.has_penalties else int(logits[r].argmax())
                    for r, s in enumerate(rows)]
        assert tokens.tolist() == expected, step
        for s, tok in zip(rows, tokens.tolist()):
            s.observe(tok)
    assert tokens.tolist() != logits.argmax(-1).tolist()  # the penalties changed something
    # a moved row keeps its settings and counts
    state.move_row(2, 0)
    assert torch.equal(state.counts[0], rows[2].output_counts)
    # fixed shapes, no host sync: the same function with every cut on gives the same greedy tokens
    again = sample_rows(logits, state.params, state.counts, state.seen, state.seed_step, cut=True)
    assert again[0] == int(apply_penalties(logits[0], rows[2]).argmax())


@pytest.mark.parametrize("preset,options", [
    ("tiny", {}), ("tiny-dense", {}), ("tiny-v3", {}),
    # the CPU-recipe options: the static steps share the model's projections and logits
    ("tiny-dense", {"qk_norm": True, "mlp_act": "relu2", "logit_softcap": 5.0}),
])
def test_static_steps_match_the_models_forward(preset, options):
    """The fixed-shape steps (full-cache masked attention, dense MoE, in-step sampling) that the
    engine replays as CUDA graphs give the model's own tokens, greedy and seeded."""
    from dsk.models import ModelConfig, Transformer
    from dsk.serving.engine import TorchBackend

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, vocab_size=64, **options)
    reference = Transformer(cfg).eval()
    fast = Transformer(cfg).eval()
    fast.load_state_dict(reference.state_dict())
    plain, static = TorchBackend(reference, 4, "cpu", static=False), TorchBackend(fast, 4, "cpu", static=True)
    assert plain.runner is None and static.runner is not None
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    kinds = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=3), dict(temperature=1.2, top_k=5, seed=4)]
    for backend in (plain, static):
        for r, (p, kw) in enumerate(zip(prompts, kinds)):
            backend.set_row(r, SequenceSampler(SamplingParams(**kw), p, 64))
    with torch.no_grad():
        a, b = plain.prefill(0, prompts), static.prefill(0, prompts)
        assert a == b
        positions = [len(p) for p in prompts]
        for step in range(12):
            a, b = plain.decode(a, positions), static.decode(b, positions)
            assert a == b, step
            positions = [p + 1 for p in positions]
    # the dense MoE is the model's MoE
    moe_layers = [i for i, blk in enumerate(fast.layers) if type(blk.ffn).__name__ == "MoE"]
    for i in moe_layers:
        x = torch.randn(3, 5, cfg.dim)
        with torch.no_grad():
            assert torch.allclose(static.runner._ffn(i, fast.layers[i].ffn, x), reference.layers[i].ffn(x)[0],
                                  atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- engine text (scripted backend)


class ScriptedBackend:
    """An engine backend that answers row r's k-th token from ``script[r]``; with ``overlaps``
    it hands tokens back through a handle, like the CUDA-graph runner's launched steps."""

    def __init__(self, scripts: list[list[int]], vocab_size: int, overlaps: bool):
        self.scripts, self.vocab_size, self.max_len = scripts, vocab_size, 4096
        self.device, self.overlaps = torch.device("cpu"), overlaps
        self.row_script: dict[int, list[int]] = {}
        self.row_step: dict[int, int] = {}
        self.admitted = 0
        self.launches: list[int] = []

    class _Done:
        def __init__(self, tokens):
            self.tokens = tokens

        def result(self):
            return self.tokens

    def set_row(self, row, sampler):
        self.row_script[row] = self.scripts[self.admitted]
        self.row_step[row] = 0
        self.admitted += 1

    def move_row(self, src, dst, length):
        self.row_script[dst], self.row_step[dst] = self.row_script.pop(src), self.row_step.pop(src)

    def _next(self, rows):
        out = []
        for r in rows:
            script, k = self.row_script[r], self.row_step[r]
            out.append(script[k] if k < len(script) else script[-1])
            self.row_step[r] = k + 1
        self.launches.append(len(rows))
        return out

    def launch_prefill(self, first_row, prompts):
        return self._Done(self._next(range(first_row, first_row + len(prompts))))

    def launch_decode(self, positions):
        return self._Done(self._next(range(len(positions))))

    def prefill(self, first_row, prompts):
        return self.launch_prefill(first_row, prompts).result()

    def decode(self, tokens, positions):
        return self.launch_decode(positions).result()


@pytest.fixture(scope="module")
def byte_codec():
    from dsk.data.tokenizer import Tokenizer, train_bpe
    from dsk.serving.text import TextCodec

    text = ["héllo wörld — naïve café ", "日本語のテキスト", "plain ascii text here"] * 20
    return TextCodec(Tokenizer(train_bpe(text, vocab_size=300)))


def _run_scripted(codec, scripts, params, overlaps, max_batch_size=4):
    import queue

    from dsk.serving.engine import Engine, iter_queue

    backend = ScriptedBackend(scripts, codec.vocab_size, overlaps)
    engine = Engine(backend, codec, max_batch_size=max_batch_size).start()
    try:
        queues = [queue.Queue() for _ in scripts]
        for q, p in zip(queues, params):
            engine.submit([1, 2, 3], p, q.put)
        streams = []
        for q in queues:
            deltas, reason = [], None
            for ev in iter_queue(q):
                if ev.kind == "delta":
                    deltas.append(ev.text)
                elif ev.kind == "finish":
                    reason = ev.finish_reason
            streams.append((deltas, reason))
        return streams, backend
    finally:
        engine.stop()


@pytest.mark.parametrize("overlaps", [False, True], ids=["one-step-at-a-time", "overlapped"])
def test_streamed_text_is_the_whole_decode_even_with_split_utf8(byte_codec, overlaps):
    """Incremental detokenisation: the deltas add up to decoding the whole sequence at once, no
    delta ends inside a character, and byte tokens that are not valid UTF-8 on their own work."""
    import random

    codec = byte_codec
    rng = random.Random(0)
    normal = [i for i in range(codec.vocab_size) if i not in codec.stop_ids]
    scripts = [codec.encode("héllo wörld — 日本語 naïve") * 2,
               [rng.choice(normal) for _ in range(60)],  # random ids: split and invalid UTF-8
               [rng.choice(normal) for _ in range(33)]]
    params = [SamplingParams(max_tokens=len(s), ignore_eos=True) for s in scripts]
    streams, _ = _run_scripted(codec, scripts, params, overlaps)
    for (deltas, reason), script in zip(streams, scripts):
        assert "".join(deltas) == codec.decode(script)
        assert reason == "length"
        assert all(d and not d.endswith("\ufffd") for d in deltas[:-1])
    assert any(len(d) > 0 for d in streams[0][0])


def test_overlapped_steps_stream_the_same_and_stop_the_same(byte_codec):
    """Overlapped steps (tokens read one step late) give exactly the one-step-at-a-time streams,
    stop strings included, and a length-limited sequence costs no extra step."""
    codec = byte_codec
    text_ids = codec.encode("plain ascii text here and more plain text")
    scripts = [text_ids, text_ids, text_ids[:5] + [next(iter(codec.stop_ids))] + text_ids]
    params = [SamplingParams(max_tokens=len(text_ids), ignore_eos=True),
              SamplingParams(max_tokens=len(text_ids), stop=("text h",)),
              SamplingParams(max_tokens=len(text_ids))]
    sync, b_sync = _run_scripted(codec, scripts, params, overlaps=False)
    over, b_over = _run_scripted(codec, scripts, params, overlaps=True)
    assert over == sync
    assert "".join(sync[1][0]) == "plain ascii " and sync[1][1] == "stop"
    assert sync[2][1] == "stop" and "".join(sync[2][0]) == codec.decode(text_ids[:5])
    # one request alone, length-limited: as many launches either way (no step after the last token)
    one, b1 = _run_scripted(codec, scripts[:1], params[:1], overlaps=True)
    _, b0 = _run_scripted(codec, scripts[:1], params[:1], overlaps=False)
    assert len(b1.launches) == len(b0.launches) == len(text_ids)


@pytest.mark.parametrize("kinds", [
    [dict(temperature=0.0)] * 3,  # greedy steps
    [dict(temperature=0.9, seed=1), dict(temperature=0.0), dict(temperature=1.3, seed=2)],  # plain sampling
    [dict(temperature=0.8, top_p=0.9, seed=3), dict(temperature=0.0, repetition_penalty=1.3),
     dict(temperature=1.0, seed=4, frequency_penalty=0.5)],  # the sort and the penalties
], ids=["greedy", "plain", "full"])
def test_decode_variants_give_the_same_tokens(kinds):
    """A decode step over the running rows' attention span only (rounded up to 64, 128, ...), with
    only the sampling its rows need, samples exactly what the full-context, full-sampling step
    does, also across a span boundary (positions 60 → 75 cross 64)."""
    from dsk.models import ModelConfig, Transformer
    from dsk.serving.engine import TorchBackend
    from dsk.serving.graphs import SAMPLING_MODES

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=64)
    models = [Transformer(cfg).eval() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fast, full = (TorchBackend(m, 4, "cpu", static=True) for m in models)
    assert fast.runner.kv_sizes == [64, 128, 256]
    # the reference: every step over the whole context with every sampling part
    full.runner.decode_variant = lambda positions, mode: (4, cfg.max_seq_len, "full")
    prompts = [list(range(1, 61)), [7, 8], list(range(5, 45))]
    for backend in (fast, full):
        for r, (p, kw) in enumerate(zip(prompts, kinds)):
            backend.set_row(r, SequenceSampler(SamplingParams(**kw), p, 64))
    expected = "greedy" if kinds[0]["temperature"] == 0.0 else "plain" if len(kinds[0]) == 2 else "full"
    assert fast._sampling_mode(3) == expected and set(SAMPLING_MODES) == {"greedy", "plain", "full"}
    with torch.no_grad():
        a, b = fast.prefill(0, prompts), full.prefill(0, prompts)
        assert a == b
        positions = [len(p) for p in prompts]
        spans = set()
        for step in range(16):
            spans.add(fast.runner.decode_variant(positions, expected)[1])
            a, b = fast.decode(a, positions), full.decode(b, positions)
            assert a == b, step
            positions = [p + 1 for p in positions]
    assert spans == {64, 128}


def test_launched_steps_beyond_the_host_ring_read_the_right_tokens():
    """More launched steps than the runner's ring of host buffers, read only at the end: each
    handle still gives its own step's tokens (a reused slot's handle reads its tokens first)."""
    from dsk.models import ModelConfig, Transformer
    from dsk.serving.engine import TorchBackend
    from dsk.serving.graphs import RING

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=64)
    models = [Transformer(cfg).eval() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    a, b = (TorchBackend(m, 2, "cpu", static=True) for m in models)
    prompts = [[1, 2, 3], [4, 5]]
    for backend in (a, b):
        for r, p in enumerate(prompts):
            backend.set_row(r, SequenceSampler(SamplingParams(temperature=0.9, seed=r), p, 64))
    with torch.no_grad():
        first = a.prefill(0, prompts)
        assert b.runner.launch_prefill(0, prompts).result() == first
        positions = [3, 2]
        expected, handles = [first], []
        tokens = first
        for _ in range(RING + 3):
            tokens = a.decode(tokens, positions)
            expected.append(tokens)
            handles.append(b.runner.launch_decode(positions, "plain"))
            positions = [p + 1 for p in positions]
    assert [first] + [h.result() for h in handles] == expected


def test_sse_json_has_no_line_breaks_any_client_could_split_on():
    """A generated text with NEL, LINE SEPARATOR or PARAGRAPH SEPARATOR (which str.splitlines,
    and so httpx's aiter_lines, treat as line ends) stays on one SSE data line and decodes back."""
    import json

    from dsk.serving.app import sse_json

    text = "a\x85b\u2028c\u2029d\x1ce\nf — é 日本"
    line = sse_json({"content": text})
    assert len(f"data: {line}".splitlines()) == 1
    assert json.loads(line) == {"content": text}
    assert "é 日本" in line  # other text stays raw UTF-8


def test_sampling_params_cross_to_an_engine_process_whole():
    """Every SamplingParams field, set off its default, survives the JSON hop to an engine process."""
    import dataclasses
    import json

    from dsk.serving.engine_process import params_from_json, params_to_json

    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=5, repetition_penalty=1.2, presence_penalty=0.3,
                            frequency_penalty=0.4, seed=2**62 + 1, max_tokens=33, stop=("a", "\n\n"), ignore_eos=True)
    defaults = SamplingParams()
    assert all(getattr(params, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(SamplingParams))
    assert params_from_json(json.loads(json.dumps(params_to_json(params)))) == params


def test_engine_process_exits_when_a_step_message_cannot_be_built():
    # a step hook that raises would leave every request waiting forever: the process exits
    # instead, which the API process turns into 503s (tests/test_serve.py covers that path)
    import socket
    from multiprocessing.connection import Connection
    from types import SimpleNamespace

    from dsk.serving.engine_process import _STATS, EngineCore

    ours, theirs = socket.socketpair()
    engine = SimpleNamespace(max_queue=0, max_batch_size=1, on_admit=None, after_step=None, device=None,
                             cuda_memory=lambda: None, **{name: 0 for name in _STATS})
    core = EngineCore(engine, Connection(theirs.detach()))
    died = []
    core.die = lambda: died.append(True)
    core.events.append([1, "delta", 0, object(), None, None, None])  # not JSON
    core.flush()
    assert died == [True]
    core.events.clear()
    core.flush()  # a good message goes out
    assert Connection(ours.detach()).poll(1)
