"""minivb.generate against transformers' InstructBlipVideoForConditionalGeneration.generate (5.24.0), token for token.

Tiny Vicuna (LLaMA) and Flan-T5 checkpoints written by transformers, batch 2 with prompts of different lengths, every
generation argument passed explicitly to both. The EOS is chosen as a token that greedy decoding really produces
mid-answer, so that rows end at different steps and beams finish early. Each comparison also checks that the
decisions had clear margins (the gap between competing scores is far above the two implementations' difference),
or token equality would say nothing.
"""

import math

import pytest
import torch

import minivb
from minivb.generate import Trace
from tests import tiny

MAX_NEW_TOKENS = 10
PAD = 0


def sharpen(model):
    """Make the tiny models' choices clear-cut, so that equal tokens mean equal computations.

    LLaMA: a larger lm_head spreads the next-token log-probs, so that the 2K candidates beam search ranks stand
    apart (gaps > 5e-4 instead of 1e-4 over 130 tokens). T5: random decoders mostly copy their input token forever;
    weaker cross- and stronger self-attention make the answer depend on what came before, so that the cache and
    the history matter.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "language_model.lm_head.weight" and model.config.text_config.model_type == "llama":
                p.mul_(3.0)
            elif "EncDecAttention.o" in name:
                p.mul_(0.3)
            elif "decoder" in name and "SelfAttention.o" in name:
                p.mul_(3.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine threads waiting on each other cost
    seconds per test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["llama", "t5"])
def models(request, tmp_path_factory):
    """(transformers model, minivb model, batch, eos): eos is a token greedy decoding reaches mid-answer in row 0."""
    text = request.param
    # transformers 5.24's T5 generate sizes its cache by the encoder's layer count: keep both stacks equal.
    overrides = dict(num_decoder_layers=2) if text == "t5" else None
    hf_model = tiny.build(text, video=True, seed=0, text_overrides=overrides)
    sharpen(hf_model)
    model = minivb.load_model(tiny.save(hf_model, tmp_path_factory.mktemp(text)))
    batch = tiny.batch(hf_model)
    del batch["labels"]
    free = reference(hf_model, batch, **arguments(eos_token_id=None))
    return hf_model, model, batch, choose_eos(free)


def choose_eos(answers):
    """A token first produced by row 0 at step >= 2 and by row 1 later or never: rows then end at different steps."""
    row0, row1 = answers.tolist()
    for step in range(2, len(row0) - 2):
        token = row0[step]
        if token not in row0[:step] and token not in row1[: step + 1]:
            return token
    raise AssertionError(f"no token to use as EOS in {answers.tolist()}")


def arguments(**overrides):
    """Every generation argument, explicitly: defaults of a checkpoint's generation_config never enter."""
    args = dict(max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=0, num_beams=1, length_penalty=1.0, early_stopping=False,
                num_return_sequences=1, repetition_penalty=1.0, no_repeat_ngram_size=0, do_sample=False,
                temperature=1.0, top_k=0, top_p=1.0, pad_token_id=PAD)
    args.update(overrides)
    return args


def reference(hf_model, batch, return_scores=False, **args):
    """transformers' new tokens (the LLaMA prompt and the T5 start token stripped) and, optionally, its scores."""
    with torch.no_grad():
        out = hf_model.generate(**batch, **args, output_scores=True, return_dict_in_generate=True)
    prompt_length = batch["input_ids"].shape[1] if hf_model.config.text_config.model_type == "llama" else 1
    ids = out.sequences[:, prompt_length:]
    return (ids, out.scores) if return_scores else ids


def with_pad_after_eos(ids, eos):
    """transformers pads beam search output with `pad_token_id or eos_token_id`, so with EOS when pad is 0;
    minivb pads with pad_token_id. Everything up to each row's first EOS is compared as is."""
    ended = (ids == eos).int().cumsum(1) - (ids == eos).int() > 0  # strictly after the first EOS
    return ids.masked_fill(ended, PAD)


def assert_clear_margins(trace: Trace, hf_scores, num_beams):
    """Our per-step scores equal transformers'; every ranking a step made had gaps far above their difference."""
    assert len(trace.scores) == len(hf_scores)
    difference = max((ours - theirs).abs().nan_to_num(0.0, 0.0, 0.0).max().item()
                     for ours, theirs in zip(trace.scores, hf_scores))
    assert difference <= 1e-5
    margin = math.inf
    for step, scores in enumerate(trace.scores):
        if num_beams > 1:  # the candidates beam search ranks: log-probs plus the running beams' scores
            B = scores.shape[0] // num_beams
            previous = trace.beam_scores[step - 1] if step else torch.tensor([0.0] + [-1e9] * (num_beams - 1))
            scores = (scores.view(B, num_beams, -1) + previous.view(-1, num_beams, 1)).view(B, -1)
        top = scores.topk(2 * num_beams + 1 if num_beams > 1 else 2).values  # greedy: best and runner-up
        gaps = top[:, :-1] - top[:, 1:]
        live = top[:, 1:] > -1e8  # pruned beams (-1e9) and banned tokens (-inf) rank behind everything
        if live.any():
            margin = min(margin, gaps[live].min().item())
    assert margin > max(100 * difference, 1e-4), f"too close to call: margin {margin}, difference {difference}"


def test_greedy_matches_transformers(models):
    hf_model, model, batch, eos = models
    args = arguments(eos_token_id=eos)
    expected, hf_scores = reference(hf_model, batch, return_scores=True, **args)
    ids, trace = model.generate(**batch, **args, return_trace=True)
    assert torch.equal(ids, expected)
    assert_clear_margins(trace, hf_scores, 1)
    # The EOS really ended row 0 mid-answer, row 1 went on, and row 0 is padded after its EOS.
    end0 = ids[0].tolist().index(eos)
    assert 2 <= end0 < ids.shape[1] - 1
    assert (ids[0, end0 + 1 :] == PAD).all() and eos not in ids[1, : end0 + 1].tolist()


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
                                       dict(min_new_tokens=4, repetition_penalty=0.8)])
def test_greedy_with_processors_matches_transformers(models, penalties):
    hf_model, model, batch, eos = models
    args = arguments(eos_token_id=eos, **penalties)
    expected, hf_scores = reference(hf_model, batch, return_scores=True, **args)
    ids, trace = model.generate(**batch, **args, return_trace=True)
    assert torch.equal(ids, expected)
    assert_clear_margins(trace, hf_scores, 1)
    if "min_new_tokens" in penalties:
        assert eos not in ids[:, :4].tolist()


def test_repetition_penalty_skips_left_padding(models):
    """transformers 5.24 leaves a prompt's leading pads out of the repetition penalty, whatever ids they hold: put
    there the token row 1 is about to choose, which would otherwise be penalised away."""
    hf_model, model, batch, eos = models
    if model.config.is_encoder_decoder:
        pytest.skip("T5 prompts are right-padded and the penalty reads the decoder's tokens")
    # tiny.batch pads row 1 after its placeholders; move its two pads to the very front, as a left-padding
    # tokenizer does with the whole prompt.
    pads = int((batch["attention_mask"][1] == 0).sum())
    num_visual = tiny.NUM_QUERY_TOKENS * batch["pixel_values"].shape[1]
    order = torch.cat([torch.arange(pads) + num_visual, torch.arange(num_visual),
                       torch.arange(num_visual + pads, batch["input_ids"].shape[1])])
    batch = dict(batch, input_ids=batch["input_ids"].clone(), attention_mask=batch["attention_mask"].clone())
    for key in ("input_ids", "attention_mask"):
        batch[key][1] = batch[key][1, order]
    args = arguments(eos_token_id=eos, repetition_penalty=3.0, max_new_tokens=4)
    first = model.generate(**batch, **args)[1, 0]
    batch["input_ids"][1, :pads] = first
    ids = model.generate(**batch, **args)
    assert torch.equal(ids, reference(hf_model, batch, **args))
    assert ids[1, 0] == first


BEAM_CASES = [
    dict(num_beams=2, length_penalty=1.0, early_stopping=False),
    dict(num_beams=3, length_penalty=-1.0, early_stopping=True, num_return_sequences=2),  # LAVIS video QA: -1
    dict(num_beams=4, length_penalty=0.0, early_stopping="never", num_return_sequences=4),
    dict(num_beams=5, length_penalty=0.6, early_stopping=False, num_return_sequences=3),
    dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=2, length_penalty=3.0, early_stopping="never", no_repeat_ngram_size=2),  # T5: differs from False
    dict(num_beams=2, length_penalty=3.0, early_stopping=False, no_repeat_ngram_size=2),
    dict(num_beams=4, length_penalty=2.0, early_stopping=True, repetition_penalty=1.5),
    dict(num_beams=3, length_penalty=0.6, early_stopping=False, no_repeat_ngram_size=2, num_return_sequences=3),
    dict(num_beams=3, length_penalty=1.0, early_stopping=True, min_new_tokens=5, num_return_sequences=2),
]


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_beam_search_matches_transformers(models, case):
    hf_model, model, batch, eos = models
    args = arguments(eos_token_id=eos, **case)
    expected, hf_scores = reference(hf_model, batch, return_scores=True, **args)
    ids, trace = model.generate(**batch, **args, return_trace=True)
    assert ids.shape == expected.shape
    assert torch.equal(ids, with_pad_after_eos(expected, eos))
    assert_clear_margins(trace, hf_scores, case["num_beams"])
    if "min_new_tokens" in case:
        assert eos not in ids[:, : case["min_new_tokens"]].tolist()


def test_a_prompt_runs_once_for_all_its_beams(models, monkeypatch):
    """The language model reads each prompt once, not once per beam (as transformers does), and gives the same
    answers as it (test_beam_search_matches_transformers)."""
    hf_model, model, batch, eos = models
    lm = model.language_model
    reads = []  # rows of every call of the language model, and how many positions each row carried
    name = "encode" if model.config.is_encoder_decoder else "forward"  # T5 reads the prompt with its encoder
    plain = getattr(lm, name)

    def counted(x, *args, **kwargs):
        reads.append(tuple(x.shape[:2]))
        return plain(x, *args, **kwargs)

    monkeypatch.setattr(lm, name, counted)
    model.generate(**batch, **arguments(eos_token_id=eos, num_beams=3))
    B, L = batch["input_ids"].shape
    assert reads[0][0] == B and reads[0][1] >= L  # the prompt (with its visual tokens), once per example
    assert all(length == 1 for _, length in reads[1:]) and all(rows == 3 * B for rows, _ in reads[1:])


def test_beam_search_finishes_hypotheses_early(models):
    """With the chosen EOS, some kept hypotheses really end before max_new_tokens (the case the rules are about)."""
    hf_model, model, batch, eos = models
    ids, trace = model.generate(**batch, **arguments(eos_token_id=eos, num_beams=4, num_return_sequences=4),
                                return_trace=True)
    assert any(h.step < MAX_NEW_TOKENS - 1 and h.tokens[-1] == eos for example in trace.hypotheses for h in example)


def test_sampling_is_reproducible_and_matches_transformers_under_the_same_seed(models):
    hf_model, model, batch, eos = models
    args = arguments(eos_token_id=eos, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, num_return_sequences=3)
    first = model.generate(**batch, **args, generator=torch.Generator().manual_seed(7))
    again = model.generate(**batch, **args, generator=torch.Generator().manual_seed(7))
    other = model.generate(**batch, **args, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape[0] == 6 and len(set(map(tuple, first.tolist()))) > 1  # samples of one prompt differ
    # transformers draws from the global generator: the same seed gives the same draws.
    torch.manual_seed(7)
    assert torch.equal(first, reference(hf_model, batch, **args))


def test_beam_sampling_matches_transformers_under_the_same_seed(models):
    hf_model, model, batch, eos = models
    args = arguments(eos_token_id=eos, do_sample=True, num_beams=3, temperature=1.3, top_k=50,
                     num_return_sequences=2)
    ids = model.generate(**batch, **args, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    assert torch.equal(ids, with_pad_after_eos(reference(hf_model, batch, **args), eos))


def filtered_distribution(logits, temperature, top_k, top_p):
    """The distribution sampling should follow, computed independently: temperature, keep the k most probable,
    renormalise, keep the smallest set of those whose mass reaches top_p, renormalise."""
    probs, order = (logits / temperature).softmax(-1).sort(descending=True)
    probs = probs[:top_k] / probs[:top_k].sum()
    keep = probs.cumsum(0) - probs < top_p  # the mass of the more probable ones has not reached top_p yet
    p = torch.zeros_like(logits)
    p[order[:top_k][keep]] = probs[keep] / probs[keep].sum()
    return p


def test_first_sampled_token_follows_the_filtered_softmax(models):
    """Thousands of first tokens (one prompt expanded by num_return_sequences) against the expected distribution."""
    hf_model, model, batch, eos = models
    one = {k: v[:1] for k, v in batch.items()}
    # Settings where both filters cut: temperatures > 1 spread the (sharpened) first-token distributions.
    temperature, top_k, top_p = (4.0, 30, 0.75) if model.config.is_encoder_decoder else (2.1, 30, 0.5)
    draws = 4000
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            start = torch.zeros(1, 1, dtype=torch.long)
            logits = model(**one, decoder_input_ids=start).logits[0, -1]
        else:
            logits = model(**one).logits[0, -1]  # no padding in row 0: forward's positions are generation's
    expected = filtered_distribution(logits, temperature, top_k, top_p)
    support = expected > 0
    assert 5 <= int(support.sum()) < top_k  # top-p cuts inside the top-k: both filters act
    args = arguments(eos_token_id=None, max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k,
                     top_p=top_p, num_return_sequences=draws)
    ids = model.generate(**one, **args, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ids[:, 0], minlength=logits.shape[0]).double()
    assert counts[~support].sum() == 0  # nothing outside the filtered set, ever
    # Pearson's chi-square over the support: with d degrees of freedom its mean is d and its sd sqrt(2d).
    expected_counts = expected[support].double() * draws
    chi2 = ((counts[support] - expected_counts) ** 2 / expected_counts).sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} with {dof} degrees of freedom"
    # The same test rejects the same tokens drawn with the temperature left out: it has power.
    untempered = logits.softmax(-1)[support].double()
    wrong = untempered / untempered.sum() * draws
    assert ((counts[support] - wrong) ** 2 / wrong).sum().item() > dof + 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("case", [dict(num_beams=1, repetition_penalty=1.3),
                                  dict(num_beams=3, num_return_sequences=3, no_repeat_ngram_size=3)])
def test_cache_equals_full_recomputation_at_every_step(models, case):
    hf_model, model, batch, eos = models
    args = arguments(eos_token_id=eos, **case)
    cached, with_cache = model.generate(**batch, **args, return_trace=True)
    recomputed, without = model.generate(**batch, **args, return_trace=True, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert len(with_cache.tokens) == len(without.tokens) > 2
    for step, (a, b) in enumerate(zip(with_cache.tokens, without.tokens)):
        assert torch.equal(a, b), f"step {step}"
    for a, b in zip(with_cache.scores, without.scores):
        assert (a - b).abs().nan_to_num(0.0, 0.0, 0.0).max() <= 1e-4


def test_beam_trace_rebuilds_the_answers(models):
    """Following parents back from each kept hypothesis spells out its tokens: what a notebook needs for the tree."""
    hf_model, model, batch, eos = models
    ids, trace = model.generate(**batch, **arguments(eos_token_id=eos, num_beams=3, num_return_sequences=3),
                                return_trace=True)
    for b, example in enumerate(trace.hypotheses):
        for rank, h in enumerate(example):
            tokens, beam = [h.tokens[-1].item()], h.parent
            for step in range(h.step - 1, -1, -1):
                tokens.append(trace.tokens[step][b, beam].item())
                beam = trace.parents[step][b, beam].item()
            assert tokens[::-1] == h.tokens.tolist()
            assert ids[b * 3 + rank, : len(tokens)].tolist() == h.tokens.tolist()
        assert [h.score for h in example] == sorted((h.score for h in example), reverse=True)


def test_prompt_without_placeholders_gets_the_visual_tokens_in_front(models):
    """minivb's own convention (LAVIS's layout): the same embeddings as placeholders in front, so the same answer."""
    hf_model, model, batch, eos = models
    num_visual = tiny.NUM_QUERY_TOKENS * batch["pixel_values"].shape[1]  # tiny.batch puts the placeholders first
    batch_in_front = dict(batch, input_ids=batch["input_ids"][:, num_visual:],
                          attention_mask=batch["attention_mask"][:, num_visual:])
    assert torch.equal(model.generate(**batch_in_front, **arguments(eos_token_id=eos)),
                       model.generate(**batch, **arguments(eos_token_id=eos)))


def test_a_prompt_past_the_positions_is_refused_before_the_vision_encoder(models, monkeypatch):
    """LLaMA's positions end (tiny: 256, Vicuna: 2048); too many frames are refused from the shapes, with the number
    that fits, before the vision encoder spends minutes on them."""
    hf_model, model, batch, eos = models
    if model.config.is_encoder_decoder:
        pytest.skip("T5's relative positions have no end")
    positions, B, T = model.config.text.max_position_embeddings, *batch["pixel_values"].shape[:2]
    num_visual, L = tiny.NUM_QUERY_TOKENS * T, batch["input_ids"].shape[1]
    fits = positions - L  # the most new tokens this prompt leaves room for
    model.generate(**batch, **arguments(eos_token_id=eos, max_new_tokens=fits, min_new_tokens=0))
    monkeypatch.setattr(model, "encode_video", lambda *args: pytest.fail("the vision encoder ran"))
    with pytest.raises(ValueError, match=f"need {positions + 1} positions, more than the language model's {positions} "
                                         f"\\(max_position_embeddings\\): at most {T - 1} frames fit"):
        model.generate(**batch, **arguments(eos_token_id=eos, max_new_tokens=fits + 1))
    in_front = dict(batch, input_ids=batch["input_ids"][:, num_visual:],
                    attention_mask=batch["attention_mask"][:, num_visual:])  # the visual tokens prepended: the same
    with pytest.raises(ValueError, match=f"{T} frames x {tiny.NUM_QUERY_TOKENS} visual tokens \\+ {L - num_visual} of"):
        model.generate(**in_front, **arguments(eos_token_id=eos, max_new_tokens=fits + 1))


def test_defaults_come_from_the_checkpoint(models):
    hf_model, model, batch, eos = models
    config = model.config.text
    explicit = model.generate(**batch, max_new_tokens=6, eos_token_id=config.eos_token_id,
                              pad_token_id=config.pad_token_id)
    assert torch.equal(model.generate(**batch, max_new_tokens=6), explicit)
    assert model.generate(**batch, max_new_tokens=0).shape == (2, 0)
    # A checkpoint without pad_token_id pads with its eos, as transformers does.
    saved = config.eos_token_id, config.pad_token_id
    config.eos_token_id, config.pad_token_id = eos, None
    try:
        ids = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS)
    finally:
        config.eos_token_id, config.pad_token_id = saved
    end0 = ids[0].tolist().index(eos)
    assert end0 < ids.shape[1] - 1 and (ids[0, end0:] == eos).all()


@pytest.mark.parametrize("bad, name", [
    (dict(num_beams=0), "num_beams"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(min_new_tokens=5, max_new_tokens=3), "min_new_tokens"),
    (dict(num_beams=2, length_penalty="long"), "length_penalty"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, early_stopping=1), "early_stopping"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(generator=7), "generator"),
    (dict(eos_token_id=10_000), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(max_new_tokens=300), "max_new_tokens"),
    (dict(beams=2), "beams"),
])
def test_bad_arguments_are_refused_by_name(models, bad, name):
    hf_model, model, batch, eos = models
    if name == "max_new_tokens" and bad["max_new_tokens"] == 300 and model.config.is_encoder_decoder:
        pytest.skip("T5 has relative positions: no length limit")
    with pytest.raises(ValueError, match=name):
        model.generate(**batch, **bad)
